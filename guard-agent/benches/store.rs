//! Event store writes: a write window of HTTP events (the shape the
//! pipeline records: attribution, ancestors, headers, masked excerpts) as
//! the store writes them (compressed chunks, `EventStore::write_batch`),
//! and the same records one sled value per event (the layout before
//! chunks), in the same run, for the ratio. Wall time of the writing
//! thread; sled's own I/O threads work beside it in both cases.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use guard_agent::{
    proc::Ancestor,
    store::{Event, EventKind, EventStore, HttpRecord},
};
use time::OffsetDateTime;

/// Events per write: about 20 ms of a busy agent.
const WINDOW: usize = 256;

fn http_event(i: usize) -> Event {
    let mut e = Event::connection(OffsetDateTime::now_utc());
    e.kind = EventKind::Http;
    e.pid = Some(40_000 + (i % 4) as u32);
    e.uid = Some(1000);
    e.user = Some("dev".into());
    e.comm = Some("python3".into());
    e.exe = Some("/usr/bin/python3.11".into());
    e.cmdline = Some("/usr/bin/python3 sync_profiles.py --all".into());
    e.ancestors = [
        (4100, "/usr/bin/bash"),
        (3900, "/usr/bin/tmux"),
        (1, "/usr/lib/systemd/systemd"),
    ]
    .iter()
    .map(|&(pid, exe)| Ancestor {
        pid,
        exe: exe.into(),
    })
    .collect();
    e.cgroup = Some("/user.slice/user-1000.slice/session-3.scope".into());
    e.src = Some(format!("127.0.0.1:{}", 40_000 + i));
    e.dst = Some("127.0.0.2:443".into());
    e.host = Some("api.example.test".into());
    e.conn_id = Some(1_556_400_166_075_420 + (i % 4) as u64);
    e.duration_ms = Some(0.8 + i as f64 / 1000.0);
    e.http = Some(HttpRecord {
        method: "POST".into(),
        scheme: "https".into(),
        host: "api.example.test".into(),
        path: format!("/v1/profiles/{i}"),
        version: "HTTP/1.1".into(),
        status: Some(200),
        request_headers: vec![
            ("host".into(), "api.example.test".into()),
            ("user-agent".into(), "python-requests/2.31".into()),
            ("content-type".into(), "application/json".into()),
            ("authorization".into(), format!("fp_{:012x}", i * 7919)),
        ],
        response_headers: vec![
            ("content-type".into(), "application/json".into()),
            ("content-length".into(), "98".into()),
        ],
        request_bytes: 105,
        response_bytes: 98,
        ttfb_ms: Some(0.5),
        total_ms: Some(0.7),
        request_excerpt: Some(format!(
            r#"{{"id": {i}, "name": "Ada Lovelace", "card": "**** **** **** 1111", "ssn": "[REDACTED:us-ssn]"}}"#
        )),
        response_excerpt: Some(r#"{"ok": true, "stored": 1}"#.into()),
        ..Default::default()
    });
    e
}

fn bench(c: &mut Criterion) {
    guard_agent::allocator::tune_for_body_buffers();
    let window: Vec<Event> = (0..WINDOW).map(http_event).collect();
    let mut g = c.benchmark_group("store_write");
    g.throughput(Throughput::Elements(WINDOW as u64));

    let dir = tempfile::tempdir().unwrap();
    let store = EventStore::open(dir.path()).unwrap();
    g.bench_function("chunks", |b| {
        b.iter_batched_ref(
            || window.clone(),
            |events| store.write_batch(events).unwrap(),
            BatchSize::SmallInput,
        )
    });

    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(Some(1000))
        .open()
        .unwrap();
    let tree = db.open_tree("events").unwrap();
    g.bench_function("one_value_per_event", |b| {
        b.iter(|| {
            let mut batch = sled::Batch::default();
            for e in &window {
                let id = db.generate_id().unwrap() + 1;
                batch.insert(&id.to_be_bytes(), serde_json::to_vec(e).unwrap());
            }
            tree.apply_batch(batch).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
