//! The upstream connector: hyper-rustls over hyper-util's TCP connector, with the connection's
//! extra left off. hyper-util's TCP connector attaches the socket's addresses (`HttpInfo`) to
//! every connection, and its client copies a connection's extra into the extensions of every
//! response on it: a map and a box per response, which nothing in the enforcer reads.

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::TryFutureExt as _;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The TLS-or-plain connector whose connections carry no extra.
#[derive(Clone)]
pub struct Connector(HttpsConnector<HttpConnector>);

impl Connector {
    /// Wraps hyper-rustls's connector.
    #[must_use]
    pub fn new(inner: HttpsConnector<HttpConnector>) -> Connector {
        Connector(inner)
    }
}

/// A connection that reports only what the client acts on: whether it is proxied and whether
/// it negotiated HTTP/2.
#[derive(Debug)]
pub struct Bare<T>(T);

/// The connection the inner connector makes.
type Stream = MaybeHttpsStream<TokioIo<TcpStream>>;

type InnerError = <HttpsConnector<HttpConnector> as tower_service::Service<http::Uri>>::Error;
type InnerFuture = <HttpsConnector<HttpConnector> as tower_service::Service<http::Uri>>::Future;

impl tower_service::Service<http::Uri> for Connector {
    type Response = Bare<Stream>;
    type Error = InnerError;
    type Future = futures::future::MapOk<InnerFuture, fn(Stream) -> Bare<Stream>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        self.0.call(uri).map_ok(Bare as fn(Stream) -> Bare<Stream>)
    }
}

impl<T: Connection> Connection for Bare<T> {
    fn connected(&self) -> Connected {
        let inner = self.0.connected();
        let bare = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() {
            bare.negotiated_h2()
        } else {
            bare
        }
    }
}

impl<T: Read + Unpin> Read for Bare<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for Bare<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose [`Connected`] says what `proxied` and `h2` say, with an extra.
    struct Fake {
        proxied: bool,
        h2: bool,
    }

    impl Connection for Fake {
        fn connected(&self) -> Connected {
            let c = Connected::new().proxy(self.proxied).extra(7u32);
            if self.h2 { c.negotiated_h2() } else { c }
        }
    }

    /// The flags the client acts on are kept; the extra, which it would copy into every
    /// response, is not.
    #[test]
    fn a_bare_connection_keeps_its_flags_and_drops_its_extra() {
        for (proxied, h2) in [(false, false), (true, false), (false, true), (true, true)] {
            let fake = Fake { proxied, h2 };
            let mut ext = http::Extensions::new();
            fake.connected().get_extras(&mut ext);
            assert_eq!(ext.get::<u32>(), Some(&7), "the fake carries an extra");
            let c = Bare(fake).connected();
            assert_eq!((c.is_proxied(), c.is_negotiated_h2()), (proxied, h2));
            let mut ext = http::Extensions::new();
            c.get_extras(&mut ext);
            assert!(ext.is_empty());
        }
    }
}
