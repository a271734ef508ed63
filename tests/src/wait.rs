//! Waiting on conditions with a deadline, never on fixed sleeps.

use std::future::Future;
use std::time::Duration;

/// Default deadline for a condition in tests.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Polls `check` until it returns true; panics with `what` after the deadline.
pub async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            if check().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "timed out after {DEADLINE:?} waiting for: {what}"
    );
}

/// Awaits `fut` with the default deadline; panics naming `what`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {DEADLINE:?}: {what}"),
    }
}
