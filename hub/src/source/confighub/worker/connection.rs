//! The worker's connection to ConfigHub: registration (targets per
//! environment), the long-poll and HTTP/2-stream transports with the lease
//! they hold, heartbeats, and the `release.published` cursor.

use super::*;

impl Worker {
    /// Runs the worker until `shutdown` (on the configured transport),
    /// with the `release.published` event cursor beside it.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let events = self.clone().follow_releases(shutdown.clone());
        let work = async {
            match self.config.transport {
                Transport::LongPoll => self.long_poll(shutdown).await,
                Transport::Http2Stream => self.stream(shutdown).await,
            }
        };
        tokio::join!(work, events);
        self.hub.metrics.confighub_connected.set(0);
    }

    /// Follows ConfigHub's `release.published` events (a server-side
    /// cursor; no lease) and hands them to release sources as wake-up hints.
    async fn follow_releases(self: Arc<Self>, shutdown: CancellationToken) {
        let mut retry = retry(Duration::from_secs(2), Duration::from_secs(60));
        loop {
            // One replica follows (a cursor is one bookmark on ConfigHub).
            if !self.hub.is_leader().await {
                if sleep_or_stop(Duration::from_secs(5), &shutdown).await {
                    return;
                }
                continue;
            }
            // From the last event handled, across restarts (the server's
            // bookmark starts at the tail for a new cursor).
            let from_cursor = self
                .hub
                .hub_state(RELEASE_CURSOR)
                .await
                .ok()
                .flatten()
                .and_then(|v| v.parse::<i64>().ok());
            let body = wire::CursorPollRequest {
                event_types: vec!["release.published".into()],
                from_cursor,
                timeout_seconds: 30,
            };
            let polled = tokio::select! {
                () = shutdown.cancelled() => return,
                p = self.client.poll_events("unitsync-releases", &body) => p,
            };
            match polled {
                Ok(events) => {
                    let mut last = from_cursor.unwrap_or(0);
                    let mut new = 0;
                    let got = !events.is_empty();
                    for m in events
                        .into_iter()
                        .filter(|m| m.event == wire::event::EVENT_LOG)
                    {
                        if let Ok(entry) = serde_json::from_value::<EventLogEntry>(m.data) {
                            // Handled already (a server counting from_cursor
                            // inclusively sends it again).
                            if from_cursor.is_some_and(|f| entry.cursor_id <= f) {
                                continue;
                            }
                            new += 1;
                            last = last.max(entry.cursor_id);
                            let _ = self.releases.send(entry);
                        }
                    }
                    if got && new == 0 && sleep_or_stop(Duration::from_secs(1), &shutdown).await {
                        return;
                    }
                    retry.reset();
                    if Some(last) != from_cursor
                        && last > 0
                        && let Err(e) = self
                            .hub
                            .set_hub_state(RELEASE_CURSOR, &last.to_string())
                            .await
                    {
                        tracing::warn!(error = %ErrorChain(&e), "cannot record the ConfigHub event cursor");
                    }
                }
                Err(e) if e.status() == Some(404) => {
                    tracing::info!(
                        "this ConfigHub has no event cursors; release events are not followed"
                    );
                    return;
                }
                Err(e) => {
                    if e.status().is_some_and(|s| (400..500).contains(&s)) {
                        tracing::warn!(error = %e, "ConfigHub refused the release event poll");
                    } else {
                        tracing::debug!(error = %e, "polling ConfigHub's release events failed");
                    }
                    if sleep_or_stop(retry.next_delay(), &shutdown).await {
                        return;
                    }
                }
            }
        }
    }

    // --- what the worker offers ---

    pub(super) async fn environments(&self) -> Vec<EnvName> {
        let all = self
            .hub
            .list_environments()
            .await
            .map(|v| v.into_iter().map(|e| e.name).collect::<Vec<_>>())
            .unwrap_or_default();
        match &self.config.environments {
            Some(only) => all.into_iter().filter(|e| only.contains(e)).collect(),
            None => all,
        }
    }

    fn info(envs: &[EnvName]) -> WorkerInfo {
        WorkerInfo {
            bridge_worker_info: BridgeWorkerInfo {
                supported_config_types: vec![SupportedConfigType {
                    provider_type: "Kubernetes".into(),
                    toolchain_type: "Kubernetes/YAML".into(),
                    live_state_type: "Kubernetes/YAML".into(),
                    available_targets: envs
                        .iter()
                        .map(|e| AvailableTarget {
                            bridge_handle: e.to_string(),
                            name: target_slug(e),
                        })
                        .collect(),
                }],
            },
            function_worker_info: wire::FunctionWorkerInfo::default(),
        }
    }

    /// Registers what the worker provides (long poll: ProvidedInfo, then
    /// one target per environment, best effort).
    async fn register(&self, envs: &[EnvName]) -> Result<(), ClientError> {
        self.client.register(&Self::info(envs)).await?;
        for e in envs {
            let t = TargetCreate {
                slug: target_slug(e),
                display_name: format!("unitsync {e}"),
                bridge_handle: e.to_string(),
                bridge_worker_id: self.config.worker_id.clone(),
                provider_type: "Kubernetes".into(),
                toolchain_type: "Kubernetes/YAML".into(),
                live_state_type: "Kubernetes/YAML".into(),
                parameters: "null".into(),
            };
            if let Err(e) = self.client.upsert_target(&t).await {
                tracing::warn!(target = %t.slug, error = %e, "cannot create the ConfigHub target");
            }
        }
        Ok(())
    }

    // --- transports ---

    async fn long_poll(self: &Arc<Self>, shutdown: CancellationToken) {
        *self
            .channel
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Channel::LongPoll;
        let mut backoff = retry(Duration::from_secs(2), Duration::from_secs(30));
        let mut registered: Option<Vec<EnvName>> = None;
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            let lease = match self.client.claim().await {
                Ok(l) => l,
                Err(e) => {
                    match e.status() {
                        Some(409) => tracing::debug!("another replica holds the ConfigHub lease"),
                        Some(s) if (400..500).contains(&s) && s != 401 => {
                            tracing::error!(error = %e, "ConfigHub refused the worker's lease; check the worker id and secret")
                        }
                        _ => {
                            tracing::warn!(error = %e, "cannot claim the ConfigHub lease; retrying")
                        }
                    }
                    if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            self.hub.metrics.confighub_connected.set(1);
            tracing::info!(worker = %self.config.worker_id, "holding the ConfigHub lease");
            let envs = self.environments().await;
            if registered.as_ref() != Some(&envs) {
                match self.register(&envs).await {
                    Ok(()) => registered = Some(envs),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot register with ConfigHub; retrying");
                        let _ = self.client.release(&lease.claim_token).await;
                        self.hub.metrics.confighub_connected.set(0);
                        if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let shift = self.begin_shift(&shutdown);
            self.resume().await;
            let lease_over = shutdown.child_token();
            let ttl = Duration::from_secs(u64::try_from(lease.ttl_seconds).unwrap_or(0).max(1));
            let polling = async {
                let stop = self
                    .poll_while_held(&lease.claim_token, ttl, &shutdown)
                    .await;
                lease_over.cancel();
                stop
            };
            let (stop, (), ()) = tokio::join!(
                polling,
                self.keep_registered(&mut registered, &lease_over),
                self.redeliver(&lease_over),
            );
            shift.end().await;
            if stop {
                return;
            }
            self.hub.metrics.confighub_connected.set(0);
        }
    }

    /// Polls while the lease is ours; true when the hub shuts down. The
    /// lease counts as lost when no poll succeeded for most of its TTL
    /// (ConfigHub may have given it to another replica meanwhile).
    async fn poll_while_held(
        self: &Arc<Self>,
        claim: &str,
        ttl: Duration,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut last_ok = tokio::time::Instant::now();
        let fence = ttl.mul_f64(0.8);
        loop {
            let started = tokio::time::Instant::now();
            let mut poll = std::pin::pin!(self.client.poll(claim));
            let polled = tokio::select! {
                () = shutdown.cancelled() => {
                    // Release first (ConfigHub shows the worker gone at
                    // once), then take what the poll in flight brings: it
                    // was dequeued for us. The next holder resumes it.
                    if let Err(e) = self.client.release(claim).await {
                        tracing::warn!(error = %e, "releasing the ConfigHub lease failed");
                    }
                    if let Ok(Ok(Polled::Events(events))) = tokio::time::timeout(SHUTDOWN_POLL, &mut poll).await {
                        for e in events {
                            self.dispatch(e).await;
                        }
                    }
                    return true;
                }
                p = &mut poll => p,
            };
            match polled {
                Ok(Polled::Nothing) => {
                    last_ok = tokio::time::Instant::now();
                    // A proxy answering at once must not make a hot loop.
                    if started.elapsed() < Duration::from_secs(1)
                        && sleep_or_stop(Duration::from_secs(1), shutdown).await
                    {
                        let _ = self.client.release(claim).await;
                        return true;
                    }
                }
                Ok(Polled::Events(events)) => {
                    last_ok = tokio::time::Instant::now();
                    for e in events {
                        self.dispatch(e).await;
                    }
                }
                Ok(Polled::LeaseLost) => {
                    tracing::warn!("the ConfigHub lease was lost; claiming it again");
                    return false;
                }
                Err(e) if e.status().is_some_and(|s| s < 500 && s != 429) => {
                    tracing::warn!(error = %e, "polling ConfigHub failed; claiming again");
                    return false;
                }
                Err(e) => {
                    if last_ok.elapsed() >= fence {
                        tracing::warn!(error = %e, "no poll succeeded for most of the lease's lifetime; it may be another replica's now");
                        return false;
                    }
                    tracing::warn!(error = %e, "polling ConfigHub failed; retrying");
                    if sleep_or_stop(Duration::from_secs(2), shutdown).await {
                        let _ = self.client.release(claim).await;
                        return true;
                    }
                }
            }
        }
    }

    /// While the lease (or stream) lasts, sends again the terminal reports
    /// ConfigHub has not taken yet and starts recorded operations nobody
    /// runs (the SDK's status queue retries forever, too).
    async fn redeliver(self: &Arc<Self>, over: &CancellationToken) {
        loop {
            if sleep_or_stop(REDELIVER_EVERY, over).await {
                return;
            }
            self.resume().await;
        }
    }

    /// While the lease is held, offers new environments as targets soon
    /// after they are created.
    async fn keep_registered(
        &self,
        registered: &mut Option<Vec<EnvName>>,
        lease_over: &CancellationToken,
    ) {
        loop {
            if sleep_or_stop(REGISTRATION_CHECK, lease_over).await {
                return;
            }
            let envs = self.environments().await;
            if registered.as_ref() != Some(&envs) {
                match self.register(&envs).await {
                    Ok(()) => *registered = Some(envs),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot update the ConfigHub registration")
                    }
                }
            }
        }
    }

    async fn stream(self: &Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = retry(Duration::from_secs(1), Duration::from_secs(60));
        loop {
            if shutdown.is_cancelled() {
                return;
            }
            // One replica of a shared store streams.
            if !self.hub.is_leader().await {
                if sleep_or_stop(Duration::from_secs(5), &shutdown).await {
                    return;
                }
                continue;
            }
            let base = self.client.stream_base().await;
            *self
                .channel
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner) =
                Channel::Stream { base: base.clone() };
            if let Err(e) = self.client.me(&base).await {
                tracing::error!(error = %e, "ConfigHub does not know this worker (a 404 usually means a wrong secret)");
                if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                    return;
                }
                continue;
            }
            let envs = self.environments().await;
            let events = match self.client.stream(&base, &Self::info(&envs)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the ConfigHub stream; retrying");
                    if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                        return;
                    }
                    continue;
                }
            };
            self.hub.metrics.confighub_connected.set(1);
            tracing::info!(worker = %self.config.worker_id, "ConfigHub stream open");
            let shift = self.begin_shift(&shutdown);
            self.resume().await;
            let opened = tokio::time::Instant::now();
            let mut events = std::pin::pin!(events);
            let mut check = tokio::time::interval(REGISTRATION_CHECK);
            let mut redeliver = tokio::time::interval(REDELIVER_EVERY);
            redeliver.tick().await;
            check.tick().await;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        shift.end().await;
                        return;
                    }
                    _ = check.tick() => {
                        // New environments need a new WorkerInfo: reconnect.
                        if self.environments().await != envs {
                            tracing::info!("environments changed; re-registering with ConfigHub");
                            break;
                        }
                        if !self.hub.is_leader().await {
                            tracing::warn!("another replica leads now; closing the ConfigHub stream");
                            break;
                        }
                    }
                    _ = redeliver.tick() => self.resume().await,
                    e = events.next() => match e {
                        Some(Ok(m)) => self.dispatch(m).await,
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "the ConfigHub stream broke; reconnecting");
                            break;
                        }
                        None => {
                            tracing::info!("the ConfigHub stream ended; reconnecting");
                            break;
                        }
                    }
                }
            }
            shift.end().await;
            self.hub.metrics.confighub_connected.set(0);
            if opened.elapsed() > Duration::from_secs(60) {
                backoff.reset();
            }
            if sleep_or_stop(backoff.next_delay(), &shutdown).await {
                return;
            }
        }
    }

    // --- events ---

    async fn dispatch(self: &Arc<Self>, m: EventMessage) {
        match m.event.as_str() {
            wire::event::WORKER => {
                let w: WorkerEventRequest = serde_json::from_value(m.data).unwrap_or_default();
                let on_stream = matches!(
                    *self
                        .channel
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                    Channel::Stream { .. }
                );
                if w.action == action::HEARTBEAT && on_stream {
                    let this = self.clone();
                    self.shift()
                        .tasks
                        .spawn(async move { this.heartbeat().await });
                }
            }
            wire::event::BRIDGE_WORKER => {
                match serde_json::from_value::<BridgeWorkerEventRequest>(m.data) {
                    Ok(req) => self.on_operation(req).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an undecodable ConfigHub operation")
                    }
                }
            }
            wire::event::EVENT_LOG => {
                if let Ok(entry) = serde_json::from_value::<EventLogEntry>(m.data) {
                    let _ = self.releases.send(entry);
                }
            }
            other => tracing::debug!(event = other, "ignoring a ConfigHub event"),
        }
    }

    /// Heartbeat reply (stream transport only).
    async fn heartbeat(&self) {
        let now = wire::rfc3339(SystemTime::now());
        let r = ActionResult {
            unit_id: wire::NIL_UUID.into(),
            space_id: wire::NIL_UUID.into(),
            queued_operation_id: wire::NIL_UUID.into(),
            action: action::HEARTBEAT.into(),
            result: result::NONE.into(),
            status: status::COMPLETED.into(),
            started_at: now.clone(),
            terminated_at: Some(now),
            ..Default::default()
        };
        if let Err(e) = self.send(&r, 1, &self.shift().stop).await {
            tracing::debug!(error = %e, "heartbeat reply failed");
        }
    }
}
