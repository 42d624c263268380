//! Spool unit tests on real files (no Redis; replay against Redis is in ledger/tests/spool.rs).

use std::path::PathBuf;
use std::time::Duration;

use chrono::Utc;

use super::*;
use crate::store::TokenCounts;

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llmw-spool-unit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn settle(id: &str, cost: i64) -> SpoolEntry {
    SpoolEntry::Settle(Settlement {
        meta: Default::default(),
        tenant: "acme".into(),
        request_id: id.into(),
        feature: None,
        session: Some("s|1".into()),
        model: Some("gpt-4o-mini".into()),
        cost: crate::Nanos(cost),
        tokens: TokenCounts {
            input: 3,
            output: 4,
            cache_read: 0,
            cache_write: 0,
        },
        estimated: true,
        started_at: chrono::DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc),
    })
}

/// Every entry in the sealed segments, in order (what a replay would send).
async fn sealed_entries(s: &Spool) -> (Vec<SpoolEntry>, u64, u64) {
    let (mut out, mut corrupt, mut torn) = (Vec::new(), 0, 0);
    for p in s.seal().await.expect("seal") {
        let b = std::fs::read(&p).expect("read segment");
        let d = format::decode(&b);
        corrupt += d.corrupt;
        torn += d.torn_bytes;
        for r in d.records {
            out.push(serde_json::from_slice(r).expect("entry json"));
        }
    }
    (out, corrupt, torn)
}

#[tokio::test]
async fn entries_survive_a_reopen_in_append_order() {
    let d = dir("order");
    let mut cfg = SpoolConfig::new(&d);
    cfg.segment_bytes = 600; // several segments
    let entries: Vec<SpoolEntry> = (0..20)
        .map(|i| {
            if i % 5 == 4 {
                SpoolEntry::Release {
                    tenant: "acme".into(),
                    request_id: format!("r{i}"),
                }
            } else {
                settle(&format!("r{i}"), i)
            }
        })
        .collect();
    {
        let s = Spool::open(cfg.clone()).expect("open");
        for e in &entries {
            s.append(e).await.expect("append");
        }
        assert_eq!(s.stats().appended, 20);
    }
    let s = Spool::open(cfg).expect("reopen");
    assert!(!s.is_empty());
    let (got, corrupt, torn) = sealed_entries(&s).await;
    assert_eq!(got, entries);
    assert_eq!((corrupt, torn), (0, 0));
    assert!(
        list_segments(&d).expect("list").len() > 2,
        "rotation made several segments"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_torn_last_record_is_ignored_after_a_crash() {
    let d = dir("torn");
    let cfg = SpoolConfig::new(&d);
    {
        let s = Spool::open(cfg.clone()).expect("open");
        s.append(&settle("a", 1)).await.expect("append");
        s.append(&settle("b", 2)).await.expect("append");
    }
    // A crash in the middle of the third write: half a record at the end of the segment.
    let (_, seg) = list_segments(&d).expect("list").pop().expect("one segment");
    let third = format::encode(&serde_json::to_vec(&settle("c", 3)).expect("json"));
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .expect("open segment");
    std::io::Write::write_all(&mut f, &third[..third.len() / 2]).expect("write");
    drop(f);
    let s = Spool::open(cfg).expect("reopen");
    s.append(&settle("d", 4)).await.expect("append after crash");
    let (got, corrupt, torn) = sealed_entries(&s).await;
    assert_eq!(got, vec![settle("a", 1), settle("b", 2), settle("d", 4)]);
    assert_eq!(corrupt, 0);
    assert_eq!(torn, (third.len() / 2) as u64);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_corrupted_record_is_skipped_and_counted() {
    let d = dir("corrupt");
    let s = Spool::open(SpoolConfig::new(&d)).expect("open");
    for (i, id) in ["a", "b", "c"].iter().enumerate() {
        s.append(&settle(id, i as i64)).await.expect("append");
    }
    let segs = s.seal().await.expect("seal");
    let mut b = std::fs::read(&segs[0]).expect("read");
    let mid = b.len() / 2; // inside record "b"
    b[mid] ^= 0xff;
    std::fs::write(&segs[0], &b).expect("write");
    let d2 = format::decode(&b);
    let ids: Vec<String> = d2
        .records
        .iter()
        .map(|r| match serde_json::from_slice(r).expect("json") {
            SpoolEntry::Settle(st) => st.request_id,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids, vec!["a", "c"]);
    assert_eq!(d2.corrupt, 1);
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn a_full_spool_refuses_and_counts_never_drops() {
    let d = dir("full");
    let mut cfg = SpoolConfig::new(&d);
    cfg.max_bytes = 1000;
    let s = Spool::open(cfg).expect("open");
    let mut ok = 0;
    let mut refused = 0;
    for i in 0..20 {
        match s.append(&settle(&format!("r{i}"), i)).await {
            Ok(()) => ok += 1,
            Err(Error::SpoolFull { used, limit, .. }) => {
                assert!(used <= limit);
                refused += 1;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(ok > 0 && refused > 0, "ok {ok} refused {refused}");
    let st = s.stats();
    assert_eq!((st.appended, st.refused_full), (ok, refused));
    assert!(st.bytes <= 1000, "{st:?}");
    let (got, _, _) = sealed_entries(&s).await;
    assert_eq!(got.len() as u64, ok, "every accepted record is on disk");
    let _ = std::fs::remove_dir_all(&d);
}

#[tokio::test]
async fn batch_durability_and_concurrent_appends() {
    let d = dir("batch");
    let mut cfg = SpoolConfig::new(&d);
    cfg.durability = Durability::Batch(Duration::from_millis(20));
    let s = Spool::open(cfg).expect("open");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.append(&settle(&format!("c{i}"), i)).await
        }));
    }
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    let (got, _, _) = sealed_entries(&s).await;
    assert_eq!(got.len(), 200);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_second_process_cannot_share_the_directory() {
    let d = dir("lock");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let _s = rt
        .block_on(async { Spool::open(SpoolConfig::new(&d)) })
        .expect("open");
    // Another open file description of the same lock file behaves like another process.
    let f = std::fs::File::options()
        .write(true)
        .open(d.join("lock"))
        .expect("open lock");
    assert!(f.try_lock().is_err(), "the lock is held");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn entry_json_is_tagged() {
    let j = serde_json::to_string(&SpoolEntry::Release {
        tenant: "t".into(),
        request_id: "r".into(),
    })
    .expect("json");
    assert_eq!(j, r#"{"kind":"release","tenant":"t","request_id":"r"}"#);
    assert_eq!(
        SpoolConfig::for_instance("enf-1").dir,
        PathBuf::from("/var/lib/llmwarden/spool/enf-1")
    );
}
