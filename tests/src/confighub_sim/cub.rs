//! A small `cub`: the operator calls of ConfigHub's CLI against its API
//! (confighub-sim or any ConfigHub), with `cub`'s names resolved the way
//! `cub` resolves them (`where=Slug = '…'`) and `apply --wait` completing
//! by `cub`'s rule: the operation has events, and the unit's
//! `LatestUnitEvent` is terminal (`Completed`, `Failed`, `Canceled`,
//! `Aborted`) or belongs to a newer operation.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine as _;
use reqwest::Method;
use serde_json::{Value, json};

/// The statuses that end an operation.
pub const TERMINAL: [&str; 4] = ["Completed", "Failed", "Canceled", "Aborted"];

/// The nil UUID `cub` sends to unset a unit's target.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// An operator's connection to ConfigHub.
#[derive(Clone)]
pub struct Cub {
    http: reqwest::Client,
    api: String,
    token: String,
}

/// How an awaited operation ended.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub unit: String,
    pub operation: String,
    /// The operation's terminal event (`Status`, `Result`, `Message`,
    /// `ResourceStatuses`, …).
    pub event: Value,
}

impl Outcome {
    pub fn status(&self) -> &str {
        self.event["Status"].as_str().unwrap_or_default()
    }

    pub fn result(&self) -> &str {
        self.event["Result"].as_str().unwrap_or_default()
    }

    pub fn message(&self) -> &str {
        self.event["Message"].as_str().unwrap_or_default()
    }
}

impl Cub {
    /// `url` is ConfigHub's base URL (the API is under `/api`).
    pub fn new(url: &str, token: &str) -> Cub {
        crate::cluster::init_crypto();
        Cub {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("an HTTP client"),
            api: format!("{}/api", url.trim_end_matches('/')),
            token: token.to_owned(),
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.api))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = if method == Method::PATCH {
                req.header("content-type", "application/merge-patch+json")
                    .body(b.to_string())
            } else {
                req.json(&b)
            };
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["Message"].as_str().map(str::to_owned))
                .unwrap_or(text);
            bail!("{method} {path}: {status}: {message}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON"))?
        })
    }

    fn quoted(s: &str) -> String {
        urlencode(&format!("Slug = '{s}'"))
    }

    /// `cub space create --allow-exists`.
    pub async fn space_create(&self, slug: &str) -> anyhow::Result<Value> {
        self.call(Method::POST, "/space", Some(json!({"Slug": slug})))
            .await
    }

    /// A space's ID from its slug (or ID).
    pub async fn space_id(&self, space: &str) -> anyhow::Result<String> {
        let list = self
            .call(
                Method::GET,
                &format!("/space?where={}", Self::quoted(space)),
                None,
            )
            .await?;
        list.as_array()
            .and_then(|a| a.first())
            .and_then(|s| s["Space"]["SpaceID"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("space {space} not found"))
    }

    /// `cub worker create` (returns the worker, with its `Secret`).
    pub async fn worker_create(&self, space: &str, slug: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        self.call(
            Method::POST,
            &format!("/space/{sid}/bridge_worker"),
            Some(json!({"Slug": slug, "SpaceID": sid})),
        )
        .await
    }

    /// `cub worker get`: the worker with its `Condition`.
    pub async fn worker_get(&self, space: &str, worker: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let v = self
            .call(
                Method::GET,
                &format!("/space/{sid}/bridge_worker/{worker}"),
                None,
            )
            .await?;
        Ok(v["BridgeWorker"].clone())
    }

    /// `cub target list`.
    pub async fn target_list(&self, space: &str) -> anyhow::Result<Vec<Value>> {
        let sid = self.space_id(space).await?;
        let v = self
            .call(Method::GET, &format!("/space/{sid}/target"), None)
            .await?;
        Ok(v.as_array()
            .map(|a| a.iter().map(|t| t["Target"].clone()).collect())
            .unwrap_or_default())
    }

    async fn target_id(&self, sid: &str, target: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                Method::GET,
                &format!("/space/{sid}/target?where={}", Self::quoted(target)),
                None,
            )
            .await?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|t| t["Target"]["TargetID"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("target {target} not found"))
    }

    async fn unit_id(&self, sid: &str, unit: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                Method::GET,
                &format!("/space/{sid}/unit?where={}", Self::quoted(unit)),
                None,
            )
            .await?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|u| u["Unit"]["UnitID"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("unit {unit} not found"))
    }

    /// `cub unit create SLUG FILE [--target T] [--label K=V]…`.
    pub async fn unit_create(
        &self,
        space: &str,
        slug: &str,
        data: &str,
        target: Option<&str>,
        labels: &[(String, String)],
    ) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        let mut body = json!({
            "Slug": slug, "ToolchainType": "Kubernetes/YAML", "Labels": labels,
            "Data": base64::engine::general_purpose::STANDARD.encode(data),
        });
        if let Some(t) = target {
            body["TargetID"] = json!(self.target_id(&sid, t).await?);
        }
        self.call(Method::POST, &format!("/space/{sid}/unit"), Some(body))
            .await
    }

    /// `cub unit update SLUG FILE`: a new revision.
    pub async fn unit_update(&self, space: &str, slug: &str, data: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let uid = self.unit_id(&sid, slug).await?;
        let body = json!({"Data": base64::engine::general_purpose::STANDARD.encode(data)});
        self.call(
            Method::PATCH,
            &format!("/space/{sid}/unit/{uid}"),
            Some(body),
        )
        .await
    }

    /// `cub unit set-target TARGET --unit U` (`-` unsets it).
    pub async fn set_target(&self, space: &str, unit: &str, target: &str) -> anyhow::Result<()> {
        self.set_target_of(space, unit, space, target).await
    }

    /// The same with a target of another space (`target_space`).
    pub async fn set_target_of(
        &self,
        space: &str,
        unit: &str,
        target_space: &str,
        target: &str,
    ) -> anyhow::Result<()> {
        let sid = self.space_id(space).await?;
        let tid = if target == "-" {
            NIL_UUID.to_owned()
        } else {
            let target_sid = self.space_id(target_space).await?;
            self.target_id(&target_sid, target).await?
        };
        let uid = self.unit_id(&sid, unit).await?;
        self.call(
            Method::PATCH,
            &format!("/space/{sid}/unit/{uid}"),
            Some(json!({"TargetID": tid})),
        )
        .await?;
        Ok(())
    }

    /// `cub unit get`: the extended unit (`Unit`, `LatestUnitEvent`, `Target`).
    pub async fn unit_get(&self, space: &str, unit: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let uid = self.unit_id(&sid, unit).await?;
        self.call(Method::GET, &format!("/space/{sid}/unit/{uid}"), None)
            .await
    }

    /// `cub unit-event list`: newest first.
    pub async fn events(&self, space: &str, unit: &str) -> anyhow::Result<Vec<Value>> {
        let sid = self.space_id(space).await?;
        let uid = self.unit_id(&sid, unit).await?;
        let v = self
            .call(
                Method::GET,
                &format!("/space/{sid}/unit/{uid}/unit_event"),
                None,
            )
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Queues `apply`, `destroy` or `refresh` on a unit; the
    /// `QueuedOperation`.
    pub async fn queue(
        &self,
        space: &str,
        unit: &str,
        action: &str,
        dry_run: bool,
    ) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let uid = self.unit_id(&sid, unit).await?;
        let query = if dry_run { "?dry_run=true" } else { "" };
        self.call(
            Method::POST,
            &format!("/space/{sid}/unit/{uid}/{action}{query}"),
            None,
        )
        .await
    }

    /// `cub unit cancel`: cancels the unit's running operation.
    pub async fn cancel(&self, space: &str, unit: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let uid = self.unit_id(&sid, unit).await?;
        self.call(
            Method::POST,
            &format!(
                "/unit/cancel?where={}",
                urlencode(&format!("UnitID = '{uid}'"))
            ),
            None,
        )
        .await
    }

    /// `cub release publish SPACE`: the `Release`.
    pub async fn release_publish(&self, space: &str) -> anyhow::Result<Value> {
        let sid = self.space_id(space).await?;
        let r = self
            .call(
                Method::POST,
                &format!("/space/{sid}/release"),
                Some(json!({})),
            )
            .await?;
        Ok(r["Release"].clone())
    }

    /// Queues an action and waits for it as `cub … --wait` does.
    pub async fn run(
        &self,
        space: &str,
        unit: &str,
        action: &str,
        dry_run: bool,
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let op = self.queue(space, unit, action, dry_run).await?;
        self.wait(space, unit, &op, timeout).await
    }

    /// `cub`'s `awaitCompletion`, then the operation's terminal event
    /// (`Failed` is an outcome here; the CLI turns it into an error).
    /// Polls with a doubling sleep from 200 ms (capped at 1.6 s; `cub`
    /// caps at 6.4 s).
    pub async fn wait(
        &self,
        space: &str,
        unit: &str,
        op: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Outcome> {
        let sid = self.space_id(space).await?;
        let uid = op["UnitID"]
            .as_str()
            .context("the operation names no unit")?
            .to_owned();
        let op_id = op["QueuedOperationID"]
            .as_str()
            .context("the operation has no ID")?
            .to_owned();
        let action = op["Action"].as_str().unwrap_or_default().to_owned();
        let events_path = format!(
            "/space/{sid}/unit/{uid}/unit_event?where={}",
            urlencode(&format!("QueuedOperationID = '{op_id}'"))
        );
        let deadline = Instant::now() + timeout;
        let mut sleep = Duration::from_millis(200);
        let mut seen_events = false;
        loop {
            if !seen_events {
                let events = self.call(Method::GET, &events_path, None).await?;
                seen_events = events.as_array().is_some_and(|a| !a.is_empty());
            }
            if seen_events {
                let units = self
                    .call(
                        Method::GET,
                        &format!(
                            "/unit?where={}&include=UnitEventID,TargetID,UpstreamUnitID,SpaceID",
                            urlencode(&format!("UnitID = '{uid}'"))
                        ),
                        None,
                    )
                    .await?;
                let latest = &units[0]["LatestUnitEvent"];
                let done = latest["QueuedOperationID"].as_str() != Some(op_id.as_str())
                    || latest["Action"].as_str() != Some(action.as_str())
                    || TERMINAL.contains(&latest["Status"].as_str().unwrap_or_default());
                if done {
                    break;
                }
            }
            if Instant::now() >= deadline {
                bail!("{action} didn't complete on unit {unit}");
            }
            tokio::time::sleep(sleep.min(deadline.saturating_duration_since(Instant::now()))).await;
            sleep = (sleep * 2).min(Duration::from_millis(1600));
        }
        let events = self.call(Method::GET, &events_path, None).await?;
        let event = events
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|e| TERMINAL.contains(&e["Status"].as_str().unwrap_or_default()))
            })
            .cloned()
            .context("no matching events found for completed operation")?;
        Ok(Outcome {
            unit: unit.to_owned(),
            operation: op_id,
            event,
        })
    }
}

/// Percent-encodes a query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
