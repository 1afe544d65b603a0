//! Telling people that a request waits: a command hook (e.g. notify-send)
//! and a Slack-compatible webhook, both fired when a hold starts.
//!
//! The hook gets the hold's summary as JSON on stdin and as `GUARD_HOLD_*`
//! environment variables; the webhook gets `{"text": ...}` with the summary
//! and the commands to approve or deny. Both carry only the masked summary.
//! The webhook is sent by the agent itself from a socket with the agent's
//! `SO_MARK` (and the agent's tgid is excluded in the kernel), so it is never
//! redirected back into the agent. A hook is a separate process: if the
//! agent runs inside a monitored cgroup, the hook's own connections are
//! monitored like any other process's.
//!
//! Failures are logged and never delay or change the hold.

use std::{path::PathBuf, process::Stdio, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

use super::HoldSummary;
use crate::{
    config::DEFAULT_STATE_DIR,
    intercept::connect::connect_tcp,
    tls::upstream::{server_name, UpstreamTls},
};

/// How long a hook or webhook may take before it is abandoned.
const NOTIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where to send notifications.
#[derive(Debug, Clone, Default)]
pub struct NotifySettings {
    /// Program and arguments run for each new hold (empty: none).
    pub command: Vec<String>,
    /// `http://` or `https://` URL receiving `{"text": ...}` (None: none).
    pub webhook: Option<Uri>,
    /// State directory, named in the suggested commands when not the default.
    pub state_dir: PathBuf,
    /// `SO_MARK` of the agent's own sockets.
    pub mark: u32,
}

/// Fires notifications in the background.
#[derive(Clone)]
pub struct Notifier {
    settings: Arc<NotifySettings>,
    tls: Option<Arc<UpstreamTls>>,
}

impl Notifier {
    pub fn new(settings: NotifySettings, tls: Option<Arc<UpstreamTls>>) -> Self {
        Self {
            settings: Arc::new(settings),
            tls,
        }
    }

    /// The commands that decide hold `id`.
    pub fn commands(&self, id: u64) -> (String, String) {
        let sd = if self.settings.state_dir.as_os_str() == DEFAULT_STATE_DIR {
            String::new()
        } else {
            format!(" --state-dir {}", self.settings.state_dir.display())
        };
        (
            format!("guard-agent approve {id}{sd}"),
            format!("guard-agent deny {id}{sd}"),
        )
    }

    /// The text a person reads.
    pub fn text(&self, s: &HoldSummary) -> String {
        let (approve, deny) = self.commands(s.id);
        format!(
            "Guard is holding request {}: {}. Findings: {}. It is denied in {}s unless approved.\nApprove: `{approve}` (add `--for 15m --scope host` to allow the host for a while)\nDeny: `{deny}`",
            s.id,
            s.headline(),
            s.finding_names(),
            s.timeout_secs
        )
    }

    /// Starts the hook and the webhook for a new hold; returns at once.
    pub fn notify(&self, s: &HoldSummary) {
        if !self.settings.command.is_empty() {
            let me = self.clone();
            let s = s.clone();
            tokio::spawn(async move {
                if let Err(e) = me.run_hook(&s).await {
                    tracing::warn!(
                        hold = s.id,
                        "notify command {:?} failed: {e}",
                        me.settings.command[0]
                    );
                }
            });
        }
        if let Some(url) = self.settings.webhook.clone() {
            let me = self.clone();
            let s = s.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(NOTIFY_TIMEOUT, me.post_webhook(&url, &s)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(hold = s.id, "webhook {url} failed: {e}"),
                    Err(_) => tracing::warn!(hold = s.id, "webhook {url} timed out"),
                }
            });
        }
    }

    async fn run_hook(&self, s: &HoldSummary) -> Result<(), String> {
        let argv = &self.settings.command;
        let (approve, deny) = self.commands(s.id);
        let json = serde_json::to_vec(s).map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        crate::limits::start_with_original_limit(&mut cmd);
        let mut child = cmd
            .args(&argv[1..])
            .env("GUARD_HOLD_ID", s.id.to_string())
            .env("GUARD_HOLD_SUMMARY", self.text(s))
            .env("GUARD_HOLD_HOST", &s.host)
            .env("GUARD_HOLD_RULE", &s.rule)
            .env("GUARD_APPROVE_COMMAND", approve)
            .env("GUARD_DENY_COMMAND", deny)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start it: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&json).await;
            let _ = stdin.write_all(b"\n").await;
        }
        match tokio::time::timeout(NOTIFY_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "still running after {}s (killed)",
                NOTIFY_TIMEOUT.as_secs()
            )),
        }
    }

    async fn post_webhook(&self, url: &Uri, s: &HoldSummary) -> Result<(), String> {
        let host = url.host().ok_or("the URL has no host")?.to_owned();
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("only http:// and https:// webhooks are supported".into()),
        };
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let addr = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let tcp = connect_tcp(addr, self.settings.mark)
            .await
            .map_err(|e| e.to_string())?;
        let body = serde_json::to_vec(&serde_json::json!({
            "text": self.text(s),
            "hold": s,
        }))
        .map_err(|e| e.to_string())?;
        let pq = url
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_owned();
        let authority = url
            .authority()
            .map(|a| a.as_str())
            .unwrap_or(&host)
            .to_owned();
        let req = Request::post(pq)
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "guard-agent")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let status = if https {
            let tls = self.tls.as_ref().ok_or("no TLS configuration")?;
            let name = server_name(Some(&bare), addr.ip()).map_err(|e| e.to_string())?;
            let stream = tls
                .connect(tcp, name, &["http/1.1".to_owned()])
                .await
                .map_err(|e| e.to_string())?;
            send(TokioIo::new(stream), req).await?
        } else {
            send(TokioIo::new(tcp), req).await?
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}

async fn send<IO>(io: IO, req: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    Ok(status)
}
