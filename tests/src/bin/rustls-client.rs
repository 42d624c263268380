//! `rustls-client`: an LLM client whose TLS is rustls (reqwest with `rustls-tls`), like Rust CLI
//! agents: no OpenSSL or Go probe decodes it, so the observer can only see its connection. Used
//! by the unmetered-bypass tests.
//!
//! Makes `--calls` chat completions on one keep-alive connection, then prints one JSON line:
//! `{"pid": .., "request_body_bytes": .., "response_body_bytes": ..}` (plaintext bodies, for the
//! test's byte-count tolerance).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// One rustls LLM client.
#[derive(Debug, Parser)]
#[command(name = "rustls-client")]
struct Args {
    /// Base URL (`https://127.0.0.1:PORT`).
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) to trust.
    #[arg(long)]
    ca: PathBuf,
    /// Calls to make on one connection.
    #[arg(long, default_value_t = 1)]
    calls: usize,
    /// Bytes of prompt text per call.
    #[arg(long, default_value_t = 20_000)]
    prompt_bytes: usize,
    /// After the first call, wait (keeping the connection open) until this file exists.
    #[arg(long)]
    wait_file: Option<PathBuf>,
    /// Call the URL's address by this name instead (sent as the TLS server name, SNI, like
    /// curl's `--resolve`); the mock's certificate does not name it, so it is not verified.
    #[arg(long)]
    server_name: Option<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&args.ca).context("reading --ca")?)?;
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .http1_only();
    let mut url = args.url.clone();
    if let Some(name) = &args.server_name {
        let parsed = reqwest::Url::parse(&args.url).context("--url")?;
        let addr = parsed
            .socket_addrs(|| None)
            .context("--url address")?
            .into_iter()
            .next()
            .context("--url has no address")?;
        builder = builder
            .resolve(name, addr)
            .danger_accept_invalid_certs(true);
        url = format!("https://{name}:{}", addr.port());
    }
    let client = builder.build()?;
    let body = serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "word ".repeat(args.prompt_bytes / 5)}],
    })
    .to_string();
    let (mut sent, mut received) = (0usize, 0usize);
    for i in 0..args.calls {
        if i == 1
            && let Some(f) = &args.wait_file
        {
            eprintln!(
                "rustls-client: first call done, waiting for {}",
                f.display()
            );
            while !f.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        let resp = client
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", "Bearer sk-test")
            .body(body.clone())
            .send()
            .await?
            .error_for_status()?;
        sent += body.len();
        received += resp.bytes().await?.len();
    }
    drop(client);
    println!(
        "{}",
        serde_json::json!({
            "pid": std::process::id(),
            "request_body_bytes": sent,
            "response_body_bytes": received,
        })
    );
    Ok(())
}
