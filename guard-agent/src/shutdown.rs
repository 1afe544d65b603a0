//! The agent's stop signal: a `watch` channel that turns `true` once, shared
//! by every long-running task so each can finish its work and return.

use tokio::sync::watch;

/// Resolves once the agent is stopping (or the sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
