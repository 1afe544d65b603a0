//! Just-in-time approval: requests whose rule says `RequireApproval` are
//! held open here until a person approves or denies them, or the hold
//! times out (a timeout is a denial).
//!
//! - `hold.rs`: what a pending hold shows (a masked summary) and decisions;
//! - `grant.rs`: scoped approvals ("allow this host for 15 minutes");
//! - `notify.rs`: the command hook and the webhook told about new holds.
//!
//! The registry ([`Approvals`]) is shared by the HTTP pipeline (which holds)
//! and the admin socket (which lists and decides). Every decision, grant
//! and revocation is recorded as an event with who made it.
//!
//! Invariants: a held request leaves only after an approval or a matching
//! grant; nothing here ever sees an unmasked value (summaries carry the
//! masked path, masked findings and a masked body preview); who decided is
//! taken from the admin socket's peer credentials, never from the request.

pub mod grant;
pub mod hold;
pub mod notify;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use time::OffsetDateTime;
use tokio::sync::{broadcast, oneshot};

pub use grant::{Grant, GrantQuery, Scope};
pub use hold::{Approver, DecisionRequest, Denial, HeldRequest, HoldSummary, Outcome};
pub use notify::{Notifier, NotifySettings};

use crate::store::{AdminRecord, Event, EventKind, EventSink};

/// How long a scoped approval lasts when `--for` is not given.
pub const DEFAULT_GRANT: Duration = Duration::from_secs(15 * 60);

/// Why a decision or revocation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no pending hold {0} (it was decided, timed out, or its client went away; `guard-agent approvals` lists the pending ones)")]
    NoSuchHold(u64),
    #[error("no grant {0} (it expired or was revoked; `guard-agent approvals grants` lists the live ones)")]
    NoSuchGrant(u64),
    #[error("--for needs --scope host or --scope rule: a request-scoped approval lets only the held request through")]
    DurationWithoutScope,
}

struct Pending {
    summary: HoldSummary,
    tx: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Inner {
    pending: BTreeMap<u64, Pending>,
    grants: Vec<Grant>,
}

/// The holds and grants of the running agent.
pub struct Approvals {
    inner: Mutex<Inner>,
    new_holds: broadcast::Sender<HoldSummary>,
    sink: EventSink,
    notifier: Notifier,
    grant_seq: AtomicU64,
}

/// Removes a hold from the registry when its request goes away (decided,
/// timed out, or the client hung up).
struct HoldGuard<'a> {
    approvals: &'a Approvals,
    id: u64,
}

impl Drop for HoldGuard<'_> {
    fn drop(&mut self) {
        self.approvals.lock().pending.remove(&self.id);
    }
}

impl Approvals {
    pub fn new(sink: EventSink, notifier: Notifier) -> Self {
        let (new_holds, _) = broadcast::channel(256);
        Self {
            inner: Mutex::default(),
            new_holds,
            sink,
            notifier,
            grant_seq: AtomicU64::new(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, e: Event) {
        let sink = self.sink.clone();
        tokio::spawn(async move { sink.record(e).await });
    }

    /// A live grant covering `q`, if any (expired grants are dropped and
    /// recorded as expired).
    pub fn grant_for(&self, q: &GrantQuery<'_>) -> Option<Grant> {
        let now = OffsetDateTime::now_utc();
        let (found, expired) = {
            let mut inner = self.lock();
            let (live, expired): (Vec<Grant>, Vec<Grant>) =
                inner.grants.drain(..).partition(|g| g.expires > now);
            inner.grants = live;
            (
                inner.grants.iter().find(|g| g.matches(q, now)).cloned(),
                expired,
            )
        };
        for g in expired {
            self.record(grant_event(&g, "expire", None, None));
        }
        found
    }

    /// Holds a request until a decision or `timeout` (which denies). The
    /// hold disappears from the list when this future ends or is dropped.
    pub async fn hold(&self, summary: HoldSummary, timeout: Duration) -> Outcome {
        let id = summary.id;
        let (tx, rx) = oneshot::channel();
        self.lock().pending.insert(
            id,
            Pending {
                summary: summary.clone(),
                tx,
            },
        );
        let _guard = HoldGuard {
            approvals: self,
            id,
        };
        tracing::info!(
            hold = id,
            rule = %summary.rule,
            host = %summary.host,
            "request held for approval"
        );
        let _ = self.new_holds.send(summary.clone());
        self.notifier.notify(&summary);
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => {
                self.record(hold_event(
                    &summary,
                    AdminRecord {
                        action: "timeout".into(),
                        hold_id: Some(id),
                        detail: Some(format!(
                            "no decision within {}",
                            humantime::format_duration(timeout)
                        )),
                        ..Default::default()
                    },
                ));
                Outcome::TimedOut { after: timeout }
            }
        }
    }

    /// Lets the request or connection `ev` describes through once a grant
    /// covers it or someone approves it; `Err` when it was denied or timed
    /// out. Records how it ended in `ev.admin`.
    pub async fn admit(
        &self,
        ev: &mut Event,
        what: HeldRequest,
        rule: &str,
        timeout: Duration,
        reason: &str,
    ) -> Result<(), Denial> {
        let q = GrantQuery {
            uid: ev.uid,
            host: &what.host,
            rule,
        };
        if let Some(g) = self.grant_for(&q) {
            ev.admin = Some(AdminRecord {
                action: "granted".into(),
                by_uid: Some(g.by_uid),
                by_user: g.by_user.clone(),
                note: g.note.clone(),
                hold_id: Some(g.hold_id),
                grant_id: Some(g.id),
                scope: Some(g.scope.as_str().into()),
                expires: Some(g.expires),
                detail: None,
            });
            return Ok(());
        }
        let summary = HoldSummary {
            id: ev.id,
            since: OffsetDateTime::now_utc(),
            timeout_secs: timeout.as_secs(),
            rule: rule.to_owned(),
            reason: reason.to_owned(),
            pid: ev.pid,
            uid: ev.uid,
            user: ev.user.clone(),
            comm: ev.comm.clone(),
            exe: ev.exe.clone(),
            ancestors: ev.ancestors.clone(),
            cgroup: ev.cgroup.clone(),
            dst: ev.dst.clone(),
            host: what.host,
            method: what.method,
            scheme: what.scheme,
            path: what.path,
            query: what.query,
            findings: ev.findings.clone(),
            body_preview: what.body_preview,
        };
        let waited = std::time::Instant::now();
        let outcome = self.hold(summary, timeout).await;
        let mut record = AdminRecord {
            hold_id: Some(ev.id),
            detail: Some(format!("held {:.1}s", waited.elapsed().as_secs_f64())),
            ..Default::default()
        };
        let result = match outcome {
            Outcome::Approved { by, note, grant } => {
                record.action = "approve".into();
                record.by_uid = Some(by.uid);
                record.by_user = by.user;
                record.note = note;
                record.grant_id = grant.as_ref().map(|g| g.id);
                record.scope = grant.as_ref().map(|g| g.scope.as_str().into());
                record.expires = grant.as_ref().map(|g| g.expires);
                Ok(())
            }
            Outcome::Denied { by, note } => {
                record.action = "deny".into();
                record.by_uid = Some(by.uid);
                record.by_user = by.user.clone();
                record.note = note.clone();
                Err(Denial::Denied { by, note })
            }
            Outcome::TimedOut { after } => {
                record.action = "timeout".into();
                Err(Denial::TimedOut { after })
            }
        };
        ev.admin = Some(record);
        result
    }

    /// Pending holds, oldest first.
    pub fn pending(&self) -> Vec<HoldSummary> {
        self.lock()
            .pending
            .values()
            .map(|p| p.summary.clone())
            .collect()
    }

    /// New holds as they come.
    pub fn subscribe(&self) -> broadcast::Receiver<HoldSummary> {
        self.new_holds.subscribe()
    }

    /// Live grants.
    pub fn grants(&self) -> Vec<Grant> {
        let now = OffsetDateTime::now_utc();
        self.lock()
            .grants
            .iter()
            .filter(|g| g.expires > now)
            .cloned()
            .collect()
    }

    /// Approves or denies hold `id`; returns the grant an approval with a
    /// host or rule scope created.
    pub fn decide(
        &self,
        id: u64,
        req: &DecisionRequest,
        by: &Approver,
    ) -> Result<Option<Grant>, ApprovalError> {
        if req.approve && req.scope == Scope::Request && req.duration_secs.is_some() {
            return Err(ApprovalError::DurationWithoutScope);
        }
        let pending = self
            .lock()
            .pending
            .remove(&id)
            .ok_or(ApprovalError::NoSuchHold(id))?;
        let s = &pending.summary;
        let mut grant = None;
        let outcome = if req.approve {
            if req.scope != Scope::Request {
                let now = OffsetDateTime::now_utc();
                let dur = req
                    .duration_secs
                    .map(Duration::from_secs)
                    .unwrap_or(DEFAULT_GRANT);
                let g = Grant {
                    id: self.grant_seq.fetch_add(1, Ordering::Relaxed),
                    scope: req.scope,
                    uid: s.uid,
                    user: s.user.clone(),
                    host: s.host.clone(),
                    rule: s.rule.clone(),
                    created: now,
                    expires: now + dur,
                    by_uid: by.uid,
                    by_user: by.user.clone(),
                    note: req.note.clone(),
                    hold_id: id,
                };
                self.lock().grants.push(g.clone());
                grant = Some(g);
            }
            Outcome::Approved {
                by: by.clone(),
                note: req.note.clone(),
                grant: grant.clone(),
            }
        } else {
            Outcome::Denied {
                by: by.clone(),
                note: req.note.clone(),
            }
        };
        let action = if req.approve { "approve" } else { "deny" };
        tracing::info!(hold = id, by_uid = by.uid, "hold decided: {action}");
        self.record(hold_event(
            s,
            AdminRecord {
                action: action.into(),
                by_uid: Some(by.uid),
                by_user: by.user.clone(),
                note: req.note.clone(),
                hold_id: Some(id),
                grant_id: grant.as_ref().map(|g| g.id),
                scope: Some(req.scope.as_str().into()),
                expires: grant.as_ref().map(|g| g.expires),
                detail: None,
            },
        ));
        if let Some(g) = &grant {
            self.record(grant_event(g, "grant", Some(by), req.note.clone()));
        }
        // The client may have gone away meanwhile; the decision stands recorded.
        let _ = pending.tx.send(outcome);
        Ok(grant)
    }

    /// Ends a grant before it expires.
    pub fn revoke(
        &self,
        grant_id: u64,
        by: &Approver,
        note: Option<String>,
    ) -> Result<Grant, ApprovalError> {
        let g = {
            let mut inner = self.lock();
            let i = inner
                .grants
                .iter()
                .position(|g| g.id == grant_id)
                .ok_or(ApprovalError::NoSuchGrant(grant_id))?;
            inner.grants.remove(i)
        };
        tracing::info!(grant = grant_id, by_uid = by.uid, "grant revoked");
        self.record(grant_event(&g, "revoke", Some(by), note));
        Ok(g)
    }
}

/// An approval event about hold `s`, attributed to the approver (if any).
fn hold_event(s: &HoldSummary, rec: AdminRecord) -> Event {
    let mut e = Event::admin(EventKind::Approval, rec.clone());
    e.uid = rec.by_uid;
    e.user = rec.by_user;
    e.host = Some(s.host.clone());
    e.dst = s.dst.clone();
    e.policy = Some(crate::store::PolicyRecord {
        rule: s.rule.clone(),
        action: "require_approval".into(),
        mode: "enforce".into(),
        would_have: None,
        reason: Some(s.reason.clone()),
    });
    e
}

fn grant_event(g: &Grant, action: &str, by: Option<&Approver>, note: Option<String>) -> Event {
    let rec = AdminRecord {
        action: action.into(),
        by_uid: by.map(|b| b.uid),
        by_user: by.and_then(|b| b.user.clone()),
        note,
        hold_id: Some(g.hold_id),
        grant_id: Some(g.id),
        scope: Some(g.scope.as_str().into()),
        expires: Some(g.expires),
        detail: Some(g.target()),
    };
    let mut e = Event::admin(EventKind::Grant, rec);
    e.uid = by.map(|b| b.uid);
    e.user = by.and_then(|b| b.user.clone());
    e.host = Some(g.host.clone());
    e
}
