//! Prometheus metrics on an opt-in local port (`--metrics 127.0.0.1:9115`),
//! OpenMetrics text at `/metrics` (which Prometheus scrapes as its text
//! format), encoded by the `prometheus-client` crate.
//!
//! Nothing here sits on the hot path: connection counters are the atomics
//! the listener already keeps, read at scrape time; everything else
//! (verdicts, requests, findings per detector, policy decisions, latency
//! histograms) is counted from the stream of stored events the writer
//! already broadcasts, in a task of its own. If that task falls behind, it
//! catches up from the store, so counts are not lost.
//!
//! Never: label a metric with anything unbounded or sensitive (paths, hosts,
//! users, values); labels are verdicts, kinds, detector and rule names.
//! The endpoint is loopback-only unless the config file says otherwise.

use std::{
    net::SocketAddr,
    sync::{atomic::AtomicI64, Arc},
};

use http_body_util::Full;
use hyper::{body::Bytes, Request, Response};
use prometheus_client::{
    collector::Collector,
    encoding::{text::encode, DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::{
    net::TcpListener,
    sync::{broadcast, watch},
};

use crate::{
    intercept::listener::Counters,
    store::{Event, EventKind, EventStore},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabel {
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabels {
    detector: String,
    masked: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    rule: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

/// The listener's live counters, read at each scrape.
#[derive(Debug)]
struct LiveCounters(Arc<Counters>);

impl Collector for LiveCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.0.snapshot();
        for (name, help, v) in [
            (
                "guard_connections_accepted",
                "Redirected connections the agent accepted",
                s.redirected,
            ),
            (
                "guard_connection_errors",
                "Connections that ended in an error (upstream refused, reset, ...)",
                s.errors,
            ),
            (
                "guard_connections_unattributed",
                "Accepted connections with no original destination (not redirected)",
                s.unknown,
            ),
        ] {
            let c = ConstCounter::new(v);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let g = ConstGauge::new(s.active as i64);
        g.encode(encoder.encode_descriptor(
            "guard_connections_active",
            "Redirected connections open now",
            None,
            g.metric_type(),
        )?)?;
        // The name every Prometheus process collector uses, so existing
        // dashboards and alerts find it.
        if let Some(m) = crate::allocator::resident() {
            let g = ConstGauge::new(m.now_kib as i64 * 1024);
            g.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory of the agent",
                None,
                g.metric_type(),
            )?)?;
        }
        if let Some(d) = crate::limits::descriptors() {
            for (name, help, v) in [
                (
                    "process_open_fds",
                    "Open file descriptors of the agent",
                    d.open,
                ),
                (
                    "process_max_fds",
                    "The agent's open-file (soft) limit",
                    d.limit,
                ),
            ] {
                let g = ConstGauge::new(v as i64);
                g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    connections: Family<VerdictLabel, Counter>,
    requests: Family<VerdictLabel, Counter>,
    findings: Family<FindingLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    bytes: Family<DirectionLabel, Counter>,
    connection_seconds: Histogram,
    request_seconds: Histogram,
    ttfb_seconds: Histogram,
    /// Requests held for a human's approval now (read at scrape time).
    holds_pending: Gauge<i64, AtomicI64>,
    /// How many holds are pending, asked at scrape time.
    pending_holds: std::sync::OnceLock<Box<dyn Fn() -> usize + Send + Sync>>,
    /// Events the store could not write (brought up to date at scrape time).
    events_lost: Counter,
    /// How many events the store has lost, asked at scrape time.
    lost_events: std::sync::OnceLock<Box<dyn Fn() -> u64 + Send + Sync>>,
    dns_queries: Family<VerdictLabel, Counter>,
    admin_actions: Family<ActionLabel, Counter>,
}

fn seconds_buckets() -> impl Iterator<Item = f64> {
    // 100 µs … ~105 s.
    exponential_buckets(0.0001, 2.0, 21)
}

impl Metrics {
    /// A registry with every metric, the live counters included.
    pub fn new(counters: Arc<Counters>) -> Self {
        let mut registry = Registry::default();
        let connections = Family::<VerdictLabel, Counter>::default();
        let requests = Family::<VerdictLabel, Counter>::default();
        let findings = Family::<FindingLabels, Counter>::default();
        let decisions = Family::<DecisionLabels, Counter>::default();
        let bytes = Family::<DirectionLabel, Counter>::default();
        let connection_seconds = Histogram::new(seconds_buckets());
        let request_seconds = Histogram::new(seconds_buckets());
        let ttfb_seconds = Histogram::new(seconds_buckets());
        let holds_pending = Gauge::<i64, AtomicI64>::default();
        let dns_queries = Family::<VerdictLabel, Counter>::default();
        let admin_actions = Family::<ActionLabel, Counter>::default();
        registry.register(
            "guard_dns_queries",
            "DNS queries answered by the agent's resolver, by verdict",
            dns_queries.clone(),
        );
        registry.register(
            "guard_admin_actions",
            "Approvals, denials, timeouts, grants, revocations and policy reloads, by action",
            admin_actions.clone(),
        );
        registry.register(
            "guard_connections",
            "Redirected connections recorded (when they close), by verdict",
            connections.clone(),
        );
        registry.register(
            "guard_http_requests",
            "HTTP requests recorded, by verdict",
            requests.clone(),
        );
        registry.register(
            "guard_findings",
            "Detector findings, by detector and whether the value was masked",
            findings.clone(),
        );
        registry.register(
            "guard_policy_decisions",
            "Policy decisions, by rule and action",
            decisions.clone(),
        );
        registry.register(
            "guard_bytes",
            "Bytes carried for redirected connections, by direction (out: to the destination)",
            bytes.clone(),
        );
        registry.register(
            "guard_connection_duration_seconds",
            "Lifetime of redirected connections",
            connection_seconds.clone(),
        );
        registry.register(
            "guard_http_request_duration_seconds",
            "HTTP request to the end of its response, through the agent",
            request_seconds.clone(),
        );
        registry.register(
            "guard_http_time_to_first_byte_seconds",
            "HTTP request head to the first byte of the response head",
            ttfb_seconds.clone(),
        );
        registry.register(
            "guard_holds_pending",
            "Requests held for approval now",
            holds_pending.clone(),
        );
        let events_lost = Counter::default();
        registry.register(
            "guard_events_lost",
            "Events the store could not write (a full disk): they are in no record",
            events_lost.clone(),
        );
        registry.register_collector(Box::new(LiveCounters(counters)));
        Self {
            registry,
            connections,
            requests,
            findings,
            decisions,
            bytes,
            connection_seconds,
            request_seconds,
            ttfb_seconds,
            holds_pending,
            pending_holds: std::sync::OnceLock::new(),
            events_lost,
            lost_events: std::sync::OnceLock::new(),
            dns_queries,
            admin_actions,
        }
    }

    /// Where `guard_holds_pending` comes from (the approvals registry).
    pub fn count_pending_holds_with(&self, f: impl Fn() -> usize + Send + Sync + 'static) {
        let _ = self.pending_holds.set(Box::new(f));
    }

    /// Where `guard_events_lost_total` comes from (the store).
    pub fn count_lost_events_with(&self, f: impl Fn() -> u64 + Send + Sync + 'static) {
        let _ = self.lost_events.set(Box::new(f));
    }

    /// Counts one stored event.
    pub fn observe(&self, e: &Event) {
        let verdict = VerdictLabel {
            verdict: e.verdict.as_str(),
        };
        match e.kind {
            EventKind::Connection => {
                self.connections.get_or_create(&verdict).inc();
                self.bytes
                    .get_or_create(&DirectionLabel { direction: "out" })
                    .inc_by(e.bytes_out);
                self.bytes
                    .get_or_create(&DirectionLabel { direction: "in" })
                    .inc_by(e.bytes_in);
                if let Some(ms) = e.duration_ms {
                    self.connection_seconds.observe(ms / 1000.0);
                }
            }
            EventKind::Http => {
                self.requests.get_or_create(&verdict).inc();
                if let Some(h) = &e.http {
                    if let Some(ms) = h.total_ms {
                        self.request_seconds.observe(ms / 1000.0);
                    }
                    if let Some(ms) = h.ttfb_ms {
                        self.ttfb_seconds.observe(ms / 1000.0);
                    }
                }
            }
            EventKind::Dns => {
                self.dns_queries.get_or_create(&verdict).inc();
            }
            EventKind::Approval | EventKind::Grant | EventKind::PolicyReload => {
                let action = e
                    .admin
                    .as_ref()
                    .map(|a| a.action.clone())
                    .unwrap_or_else(|| "unknown".into());
                self.admin_actions
                    .get_or_create(&ActionLabel { action })
                    .inc();
            }
        }
        if let Some(p) = &e.policy {
            self.decisions
                .get_or_create(&DecisionLabels {
                    rule: p.rule.clone(),
                    action: p.action.clone(),
                })
                .inc();
        }
        for f in &e.findings {
            self.findings
                .get_or_create(&FindingLabels {
                    detector: f.detector.clone(),
                    masked: if f.applied { "true" } else { "false" },
                })
                .inc();
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        if let Some(f) = self.pending_holds.get() {
            self.holds_pending.set(f() as i64);
        }
        if let Some(f) = self.lost_events.get() {
            // The store's count only grows.
            let behind = f().saturating_sub(self.events_lost.get());
            self.events_lost.inc_by(behind);
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Counts every event the writer stores until `stop`. After a lag (more
/// than the broadcast buffer behind), events above the highest id seen are
/// read back from the store; ones with lower ids stored meanwhile are lost
/// to the counts (the store still has them).
pub async fn observe_events(
    metrics: Arc<Metrics>,
    mut stored: broadcast::Receiver<Arc<Event>>,
    store: EventStore,
    mut stop: watch::Receiver<bool>,
) {
    let mut last = 0u64;
    loop {
        tokio::select! {
            msg = stored.recv() => match msg {
                // Ids are reserved when a connection or request starts and
                // stored when it ends: they arrive out of order, so every
                // message counts; `last` only bounds the catch-up below.
                Ok(e) => {
                    last = last.max(e.id);
                    metrics.observe(&e);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let s = store.clone();
                    let missed = tokio::task::spawn_blocking(move || s.after(last)).await;
                    for e in missed.ok().and_then(Result::ok).unwrap_or_default() {
                        if e.id > last {
                            last = e.id;
                            metrics.observe(&e);
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint {addr}: {source} (choose another with --metrics)")]
pub struct MetricsError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError { addr, source })
}

/// Serves `GET /metrics` until `stop`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, mut stop: watch::Receiver<bool>) {
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => { tracing::warn!("metrics accept failed: {e}"); continue; }
            },
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let resp = if req.uri().path() == "/metrics" {
                        Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    };
                    Ok::<_, http::Error>(resp.expect("static response parts"))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{FindingRecord, HttpRecord, PolicyRecord, Verdict};
    use std::sync::atomic::Ordering;

    #[test]
    fn events_and_live_counters_show_up_in_the_text() {
        let counters = Arc::new(Counters::default());
        counters.redirected.fetch_add(3, Ordering::Relaxed);
        counters.active.fetch_add(1, Ordering::Relaxed);
        let m = Metrics::new(Arc::clone(&counters));
        let mut c = Event::connection(time::OffsetDateTime::now_utc());
        c.bytes_out = 5;
        c.duration_ms = Some(12.0);
        m.observe(&c);
        let mut h = Event::connection(time::OffsetDateTime::now_utc());
        h.kind = EventKind::Http;
        h.verdict = Verdict::Block;
        h.http = Some(HttpRecord {
            ttfb_ms: Some(1.0),
            total_ms: Some(2.0),
            ..Default::default()
        });
        h.policy = Some(PolicyRecord {
            rule: "no-evil".into(),
            action: "block".into(),
            ..Default::default()
        });
        h.findings = vec![FindingRecord {
            detector: "aws-access-key".into(),
            applied: false,
            ..Default::default()
        }];
        m.observe(&h);
        let text = m.render();
        for line in [
            "guard_connections_accepted_total 3",
            "guard_connections_active 1",
            "guard_connections_total{verdict=\"allow\"} 1",
            "guard_http_requests_total{verdict=\"block\"} 1",
            "guard_findings_total{detector=\"aws-access-key\",masked=\"false\"} 1",
            "guard_policy_decisions_total{rule=\"no-evil\",action=\"block\"} 1",
            "guard_bytes_total{direction=\"out\"} 5",
            "guard_connection_duration_seconds_count 1",
            "guard_http_time_to_first_byte_seconds_count 1",
            "guard_holds_pending 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
