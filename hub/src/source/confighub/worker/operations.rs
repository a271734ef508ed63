//! The worker's operations: recording, starting and superseding them,
//! Apply/Destroy/Refresh carried out through `Hub`, waiting on the
//! clusters, and exactly one terminal report each (also after a restart).

use super::*;

impl Worker {
    pub(super) async fn on_operation(self: &Arc<Self>, req: BridgeWorkerEventRequest) {
        let p = req.payload;
        let id = p.queued_operation_id.clone();
        // The SDK refuses operations without an ID; so does the hub (the
        // ID keys the durable record).
        if !uuid::Uuid::parse_str(&id).is_ok_and(|u| !u.is_nil()) {
            tracing::warn!(action = %req.action, "skipping a ConfigHub operation without a valid QueuedOperationID");
            return;
        }
        match req.action.as_str() {
            action::CANCEL => self.cancel(&id),
            action::APPLY
            | action::DESTROY
            | action::REFRESH
            | action::IMPORT
            | action::FINALIZE => {
                if self.lock_running().contains_key(&id) {
                    return;
                }
                match self.hub.get_operation(&id).await {
                    // Delivered again (a reconnect): already handled.
                    Ok(Some(op)) if op.delivered => return,
                    Ok(Some(op)) => {
                        self.resume_one(op).await;
                        return;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(op = %id, error = %ErrorChain(&e), "cannot look up a ConfigHub operation");
                        return;
                    }
                }
                self.start(req.action, p).await;
            }
            other => {
                // The SDK's answer to an action it does not know.
                let r = ActionResult {
                    unit_id: p.unit_id,
                    space_id: p.space_id,
                    queued_operation_id: id,
                    revision_num: p.revision_num,
                    action: other.to_owned(),
                    result: result::NONE.into(),
                    status: status::NONE.into(),
                    message: format!("unknown operation name: {other}"),
                    started_at: wire::rfc3339(SystemTime::now()),
                    ..Default::default()
                };
                let this = self.clone();
                self.shift().tasks.spawn(async move {
                    if let Err(e) = this.send(&r, 3, &this.shift().stop).await {
                        tracing::warn!(error = %e, "reporting an unknown action failed");
                    }
                });
            }
        }
    }

    /// Records a new operation, supersedes a running one of the same unit,
    /// and starts it.
    async fn start(self: &Arc<Self>, act: String, p: BridgeWorkerPayload) {
        let environment = if p.bridge_handle.is_empty() {
            // Older servers leave it out: only a hub offering one
            // environment knows which (otherwise the Apply fails, naming why).
            match self.environments().await.as_slice() {
                [only] => only.to_string(),
                _ => String::new(),
            }
        } else {
            p.bridge_handle.clone()
        };
        let detail = Detail {
            unit_id: p.unit_id.clone(),
            space_id: p.space_id.clone(),
            space_slug: p.space_slug.clone(),
            unit_slug: p.unit_slug.clone(),
            revision_num: p.revision_num,
            environment: environment.clone(),
            dry_run: p.dry_run,
            started_at: wire::rfc3339(SystemTime::now()),
            started_ms: UnixMillis::now().0,
            wait_seconds: wait_timeout(&p, self.config.wait_timeout).as_secs(),
            labels: p.unit_labels.clone(),
            data: String::from_utf8_lossy(&p.data.0).into_owned(),
        };
        let op = SourceOperation {
            id: p.queued_operation_id.clone(),
            source: self.source.clone(),
            unit: format!("{environment}/{}", p.unit_slug),
            action: act,
            state: RUNNING.into(),
            hub_revision: RevisionNum(0),
            report: String::new(),
            delivered: false,
            detail: serde_json::to_string(&detail).unwrap_or_default(),
            created_at: UnixMillis::now(),
        };
        if let Err(e) = self.hub.put_operation(&op).await {
            // Not recorded: do not act. ConfigHub delivers it again later.
            tracing::error!(op = %op.id, error = %ErrorChain(&e), "cannot record a ConfigHub operation");
            return;
        }
        self.spawn_superseding(op, detail);
    }

    /// Starts an operation; an Apply or Destroy ends the older ones of its
    /// unit still running (also when operations are resumed: two found
    /// open after a restart end as if both had arrived while it ran).
    fn spawn_superseding(self: &Arc<Self>, op: SourceOperation, detail: Detail) {
        let newer = matches!(op.action.as_str(), action::APPLY | action::DESTROY)
            .then(|| (detail.unit_id.clone(), op.id.clone(), detail.started_ms));
        self.spawn(op, detail);
        if let Some((unit_id, id, started_ms)) = newer {
            self.supersede(&unit_id, &id, started_ms);
        }
    }

    pub(super) fn spawn(self: &Arc<Self>, op: SourceOperation, detail: Detail) {
        let shift = self.shift();
        if shift.stop.is_cancelled() {
            // Between leases: the next holder resumes it from the store.
            return;
        }
        let running = Arc::new(Running::new(
            op.unit.clone(),
            op.action.clone(),
            detail,
            false,
        ));
        self.lock_running().insert(op.id.clone(), running.clone());
        let this = self.clone();
        shift.tasks.spawn(async move {
            let outcome = tokio::select! {
                () = shift.stop.cancelled() => {
                    // An ending held while it committed is recorded now
                    // (whoever holds the lease next sends it).
                    if let Some((st, why)) = running.end_commit() {
                        this.end(
                            &op.id,
                            &running,
                            st,
                            &format!("{why} (the hub stopped while it committed; the commit may have gone through)"),
                        );
                    }
                    this.forget(&op.id, &running);
                    return;
                }
                o = this.decide(&op, &running) => o,
            };
            this.finish(op, running, outcome, &shift.stop).await;
        });
    }

    /// A newer Apply or Destroy of a ConfigHub unit (by its id: units of
    /// other spaces may share its slug and target) ends the older ones
    /// running: `Aborted`. An older operation delivered again never ends a
    /// newer one.
    fn supersede(self: &Arc<Self>, unit_id: &str, newer: &str, newer_started_ms: i64) {
        let older: Vec<(String, Arc<Running>)> = self
            .lock_running()
            .iter()
            .filter(|(id, r)| {
                r.detail.unit_id == unit_id
                    && *id != newer
                    && r.detail.started_ms <= newer_started_ms
                    && matches!(r.action.as_str(), action::APPLY | action::DESTROY)
            })
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        for (id, r) in older {
            let ended = self.end(
                &id,
                &r,
                status::ABORTED,
                &format!("Operation overridden by newer operation {newer}"),
            );
            if ended {
                tracing::info!(op = %id, %newer, "superseded");
            }
        }
    }

    /// `Cancel`: the running operation ends `Canceled` (nothing is reported
    /// for the Cancel event itself).
    pub(super) fn cancel(self: &Arc<Self>, id: &str) {
        let found = self.lock_running().get(id).cloned();
        match found {
            Some(r) => {
                self.end(
                    id,
                    &r,
                    status::CANCELED,
                    "Operation cancelled by user request",
                );
            }
            None => tracing::info!(op = %id, "cancel of an operation not running here"),
        }
    }

    /// Ends a running operation from outside (supersede, cancel); one that
    /// is committing reports it once the commit is done (see
    /// [`Running::end`]).
    pub(super) fn end(
        self: &Arc<Self>,
        id: &str,
        r: &Arc<Running>,
        st: &'static str,
        message: &str,
    ) -> bool {
        match r.end(st, message) {
            Ending::Decided => {}
            Ending::Held => return true,
            Ending::Already => return false,
        }
        r.cancel.cancel();
        let report = self.result(id, &r.action, &r.detail, result::NONE, st, message);
        let this = self.clone();
        let id = id.to_owned();
        let r = r.clone();
        let shift = self.shift();
        shift.tasks.spawn(async move {
            // After a progress report in flight (its retries end with
            // `cancel`).
            let turn = r.reporting.lock().await;
            this.deliver(&id, &r.unit, &r.action, report, &shift.stop)
                .await;
            drop(turn);
            this.forget(&id, &r);
        });
        true
    }

    // --- carrying operations out ---

    fn result(
        &self,
        id: &str,
        act: &str,
        d: &Detail,
        res: &str,
        st: &str,
        message: &str,
    ) -> ActionResult {
        // As the SDK: TerminatedAt on every report with a result except
        // ApplyWaitFailed, and on the Canceled/Aborted endings (no result).
        let terminated = if res == result::NONE {
            status::is_terminal(st)
        } else {
            res != result::APPLY_WAIT_FAILED
        };
        ActionResult {
            unit_id: d.unit_id.clone(),
            space_id: d.space_id.clone(),
            queued_operation_id: id.to_owned(),
            revision_num: d.revision_num,
            action: act.to_owned(),
            result: res.to_owned(),
            status: st.to_owned(),
            message: message.to_owned(),
            started_at: d.started_at.clone(),
            terminated_at: terminated.then(|| wire::rfc3339(SystemTime::now())),
            ..Default::default()
        }
        .bounded()
    }

    /// Carries an operation out, up to its outcome.
    async fn decide(&self, op: &SourceOperation, r: &Running) -> Outcome {
        match op.action.as_str() {
            action::APPLY => self.apply(op, r).await,
            action::DESTROY => self.destroy(op, r).await,
            action::REFRESH => self.refresh(op, r).await,
            action::IMPORT => Outcome::failed(
                result::IMPORT_FAILED,
                "unitsync does not import live resources into ConfigHub; apply the unit instead",
            ),
            _ => Outcome::done(result::NONE, "nothing to finalize"),
        }
    }

    /// Reports the outcome, unless a cancel or a newer operation ended it
    /// first (that ending was reported instead).
    async fn finish(
        &self,
        op: SourceOperation,
        r: Arc<Running>,
        outcome: Outcome,
        stop: &CancellationToken,
    ) {
        if r.decided.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut report = self.result(
            &op.id,
            &op.action,
            &r.detail,
            outcome.result,
            outcome.status,
            &outcome.message,
        );
        report.resource_statuses = outcome.resources;
        report.error_messages = outcome.errors;
        report.data = wire::Bytes(outcome.data);
        if let Some(b) = outcome.bridge {
            report.bridge_state = wire::Bytes(b.to_string().into_bytes());
        }
        self.deliver(&op.id, &op.unit, &op.action, report, stop)
            .await;
        self.forget(&op.id, &r);
    }

    /// Records the terminal report durably, then sends it (retried; kept
    /// for the next connection when ConfigHub is away).
    async fn deliver(
        &self,
        id: &str,
        unit: &str,
        act: &str,
        report: ActionResult,
        stop: &CancellationToken,
    ) {
        self.hub
            .metrics
            .confighub_operations
            .get_or_create(&OperationLabels {
                action: act.to_owned(),
                result: if report.result == result::NONE {
                    report.status.clone()
                } else {
                    report.result.clone()
                },
            })
            .inc();
        let text = serde_json::to_string(&report).unwrap_or_default();
        let mut op = match self.hub.get_operation(id).await {
            Ok(Some(op)) => op,
            _ => SourceOperation {
                id: id.to_owned(),
                source: self.source.clone(),
                unit: unit.to_owned(),
                action: act.to_owned(),
                state: RUNNING.into(),
                hub_revision: RevisionNum(0),
                report: String::new(),
                delivered: false,
                detail: "{}".into(),
                created_at: UnixMillis::now(),
            },
        };
        op.state = REPORTED.into();
        op.report = text;
        match self.hub.decide_operation(&op).await {
            Ok(true) => self.send_recorded(op, &report, stop).await,
            // Another replica (or an earlier run) decided it: its report
            // is the one ConfigHub gets.
            Ok(false) => tracing::info!(op = %id, "this operation's ending was recorded already"),
            Err(e) => {
                // Not recorded: not sent either; whoever resumes it decides.
                tracing::error!(op = %id, error = %ErrorChain(&e), "cannot record a ConfigHub report");
            }
        }
    }

    async fn send_recorded(
        &self,
        mut op: SourceOperation,
        report: &ActionResult,
        stop: &CancellationToken,
    ) {
        match self.send(report, 15, stop).await {
            Ok(()) => {}
            Err(e) if e.is_retryable() => {
                // Kept: sent again when the worker (re)connects.
                tracing::warn!(op = %op.id, error = %e, "the terminal report did not reach ConfigHub yet");
                return;
            }
            Err(e) if report.result == result::APPLY_STUCK => {
                // A server that does not know ApplyStuck: say it the SDK's way.
                tracing::warn!(op = %op.id, error = %e, "ConfigHub refused ApplyStuck; reporting ApplyWaitFailed");
                let mut fallback = report.clone();
                fallback.result = result::APPLY_WAIT_FAILED.into();
                fallback.terminated_at = None;
                if let Err(e) = self.send(&fallback, 15, stop).await {
                    tracing::error!(op = %op.id, error = %e, "ConfigHub refused the terminal report");
                    if e.is_retryable() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::error!(op = %op.id, error = %e, "ConfigHub refused the terminal report")
            }
        }
        op.delivered = true;
        if let Err(e) = self.hub.put_operation(&op).await {
            tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot mark a ConfigHub report delivered");
        }
    }

    /// Sends one report with the SDK's retry policy (1 s to 30 s, x2,
    /// +-50 %, at most `tries`, 5 minutes in all; 409 and 5xx retried),
    /// giving up between tries when `stop` (the report stays recorded).
    pub(super) async fn send(
        &self,
        report: &ActionResult,
        tries: u32,
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let mut retry = retry(Duration::from_secs(1), Duration::from_secs(30));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
        let mut n = 0;
        loop {
            let channel = self
                .channel
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let r = match &channel {
                Channel::LongPoll => self.client.report(report).await,
                Channel::Stream { base } => self.client.report_stream(base, report).await,
            };
            n += 1;
            match r {
                Ok(()) => return Ok(()),
                Err(e) if !e.is_retryable() || n >= tries => return Err(e),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(e) => {
                    self.hub.metrics.confighub_report_retries.inc();
                    if sleep_or_stop(retry.next_delay(), stop).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// A progress report (best effort: a lost one is superseded by the
    /// next). Never after the ending, nor while one is sent (a cancel or
    /// a newer operation): an ending waits for a progress report in
    /// flight, and a progress report's retries stop at the ending.
    async fn progress(&self, op: &SourceOperation, run: &Running, res: &str, message: &str) {
        let Ok(_turn) = run.reporting.try_lock() else {
            return;
        };
        if run.decided.load(Ordering::SeqCst) {
            return;
        }
        let mut r = self.result(
            &op.id,
            &op.action,
            &run.detail,
            res,
            status::PROGRESSING,
            message,
        );
        if res == result::NONE {
            r.terminated_at = None;
        }
        // Called within the operation's task, which the shift's end stops.
        if let Err(e) = self.send(&r, 2, &run.cancel).await {
            tracing::debug!(op = %op.id, error = %e, "progress report failed");
        }
    }

    /// Re-reads the operations not yet reported (after a restart, or when
    /// this replica takes the lease over) and finishes each.
    pub(super) async fn resume(self: &Arc<Self>) {
        let ops = match self.hub.open_operations(&self.source).await {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "cannot read the open ConfigHub operations");
                return;
            }
        };
        for op in ops {
            self.resume_one(op).await;
        }
    }

    async fn resume_one(self: &Arc<Self>, op: SourceOperation) {
        if self.lock_running().contains_key(&op.id) {
            return;
        }
        if op.state == REPORTED {
            let Ok(report) = serde_json::from_str::<ActionResult>(&op.report) else {
                return;
            };
            let shift = self.shift();
            if shift.stop.is_cancelled() {
                return;
            }
            tracing::info!(op = %op.id, "sending a recorded terminal report");
            // Decided already: a cancel or a newer operation leaves it be.
            let r = Arc::new(Running::new(
                op.unit.clone(),
                op.action.clone(),
                Detail::default(),
                true,
            ));
            self.lock_running().insert(op.id.clone(), r.clone());
            let this = self.clone();
            shift.tasks.spawn(async move {
                let id = op.id.clone();
                this.send_recorded(op, &report, &shift.stop).await;
                this.forget(&id, &r);
            });
            return;
        }
        let detail: Detail = serde_json::from_str(&op.detail).unwrap_or_default();
        tracing::info!(op = %op.id, unit = %op.unit, action = %op.action, "resuming a ConfigHub operation");
        self.spawn_superseding(op, detail);
    }

    // --- Apply, Destroy, Refresh ---

    fn unit_ref(&self, d: &Detail) -> Result<UnitRef, String> {
        if d.environment.is_empty() {
            return Err("the operation names no target environment (no BridgeHandle) and this hub offers several; use a ConfigHub that sends BridgeHandle, or offer one environment".into());
        }
        let env: EnvName = d
            .environment
            .parse()
            .map_err(|e: crate::model::NameError| format!("target: {e}"))?;
        if !self
            .config
            .environments
            .as_ref()
            .is_none_or(|only| only.contains(&env))
        {
            return Err(format!("environment {env} is not offered to ConfigHub"));
        }
        let name: UnitName = d.unit_slug.parse().map_err(|e: crate::model::NameError| {
            format!("ConfigHub unit slug: {e} (unitsync unit names are DNS-1123 labels)")
        })?;
        Ok(UnitRef { env, name })
    }

    async fn apply(&self, op: &SourceOperation, r: &Running) -> Outcome {
        let d = &r.detail;
        let unit = match self.unit_ref(d) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::APPLY_FAILED, m),
        };
        let origin = format!(
            "confighub {}/{}@{} unit {} op {}",
            d.space_slug, d.unit_slug, d.revision_num, d.unit_id, op.id
        );
        let mut revision = op.hub_revision;
        if revision.0 == 0 {
            // Committed before a restart? The origin names the operation.
            revision = self.committed_by(&unit, &op.id).await;
        }
        if revision.0 == 0 {
            if d.data.is_empty() {
                return Outcome::failed(
                    result::APPLY_FAILED,
                    "the operation carries no configuration data",
                );
            }
            if d.dry_run {
                return match self.hub.validate(&unit, d.data.clone()).await {
                    Ok((v, _)) => Outcome::done(
                        result::APPLY_COMPLETED,
                        format!(
                            "dry run: {unit} is valid ({} objects); nothing was committed",
                            v.documents()
                        ),
                    ),
                    Err(e) => failed_validation(&e),
                };
            }
            let guard = self.commit_lock(&unit).await;
            if !r.start_commit() {
                return Outcome::done(result::NONE, "ended before committing");
            }
            let committed = self
                .hub
                .commit_from_source(SourceCommit {
                    source: owner(d),
                    actor: self.actor(),
                    unit: unit.clone(),
                    manifests: d.data.clone(),
                    // ConfigHub's unit labels select units for promotion.
                    labels: Some(d.labels.clone()),
                    origin,
                    message: format!(
                        "ConfigHub {}/{} revision {}",
                        d.space_slug, d.unit_slug, d.revision_num
                    ),
                })
                .await;
            match committed {
                Ok(rev) => revision = rev.number,
                Err(e) => {
                    return held_ending(r.end_commit(), &unit, None)
                        .unwrap_or_else(|| failed_validation(&e));
                }
            }
            let mut recorded = op.clone();
            recorded.hub_revision = revision;
            // The manifests are in the store now.
            let mut light = d.clone();
            light.data.clear();
            recorded.detail = serde_json::to_string(&light).unwrap_or_default();
            if let Err(e) = self.hub.put_operation(&recorded).await {
                tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot record the committed revision");
            }
            drop(guard);
            if let Some(o) = held_ending(r.end_commit(), &unit, Some(revision)) {
                return o;
            }
        }
        self.progress(
            op,
            r,
            result::APPLY_SYNCED,
            &format!("committed as {unit} revision {revision}; waiting for every cluster of {} to report it Ready", unit.env),
        )
        .await;
        self.wait(op, r, &unit, revision, Phase::Ready)
            .await
            .with_bridge(&unit, revision)
    }

    async fn destroy(&self, op: &SourceOperation, r: &Running) -> Outcome {
        let d = &r.detail;
        let unit = match self.unit_ref(d) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::DESTROY_FAILED, m),
        };
        let mut revision = op.hub_revision;
        if revision.0 == 0 {
            revision = self.committed_by(&unit, &op.id).await;
        }
        if revision.0 == 0 && d.dry_run {
            let what = match self
                .hub
                .get_unit(&unit, false, Role::Admin, &Page::ALL)
                .await
            {
                Ok(v) if !v.unit.destroyed => {
                    format!("dry run: would destroy {unit} (revision {})", v.unit.head)
                }
                _ => format!("dry run: {unit} has nothing to destroy"),
            };
            return Outcome::done(
                result::DESTROY_COMPLETED,
                format!("{what}; nothing was committed"),
            );
        }
        if revision.0 == 0 {
            let guard = self.commit_lock(&unit).await;
            if !r.start_commit() {
                return Outcome::done(result::NONE, "ended before committing");
            }
            let destroyed = self
                .hub
                .destroy_from_source(
                    &owner(d),
                    self.actor(),
                    unit.clone(),
                    format!("confighub {}/{} op {}", d.space_slug, d.unit_slug, op.id),
                    format!("ConfigHub destroy of {}/{}", d.space_slug, d.unit_slug),
                )
                .await;
            match destroyed {
                Ok(Some(rev)) => revision = rev.number,
                Ok(None) => {
                    return held_ending(r.end_commit(), &unit, None).unwrap_or_else(|| {
                        Outcome::done(
                            result::DESTROY_COMPLETED,
                            format!("{unit} has nothing to destroy"),
                        )
                    });
                }
                Err(e) => {
                    return held_ending(r.end_commit(), &unit, None)
                        .unwrap_or_else(|| Outcome::failed(result::DESTROY_FAILED, e.to_string()));
                }
            }
            let mut recorded = op.clone();
            recorded.hub_revision = revision;
            if let Err(e) = self.hub.put_operation(&recorded).await {
                tracing::warn!(op = %op.id, error = %ErrorChain(&e), "cannot record the committed revision");
            }
            drop(guard);
            if let Some(o) = held_ending(r.end_commit(), &unit, Some(revision)) {
                return o;
            }
        }
        self.progress(
            op,
            r,
            result::NONE,
            &format!(
                "committed the destroy of {unit} as revision {revision}; waiting for every cluster"
            ),
        )
        .await;
        self.wait(op, r, &unit, revision, Phase::Destroyed)
            .await
            .with_bridge(&unit, revision)
    }

    async fn refresh(&self, _op: &SourceOperation, r: &Running) -> Outcome {
        let unit = match self.unit_ref(&r.detail) {
            Ok(u) => u,
            Err(m) => return Outcome::failed(result::REFRESH_FAILED, m),
        };
        let view = match self
            .hub
            .get_unit(&unit, false, Role::Admin, &Page::ALL)
            .await
        {
            Ok(v) => v,
            Err(e) => return Outcome::failed(result::REFRESH_FAILED, e.to_string()),
        };
        let mut drifted = Vec::new();
        for c in &view.cells {
            for res in c
                .status
                .resources
                .iter()
                .filter(|r| !r.drifted_fields.is_empty())
            {
                drifted.push(format!(
                    "{}: {} {}{} drifted at {}",
                    c.cluster,
                    res.kind,
                    if res.namespace.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", res.namespace)
                    },
                    res.name,
                    res.drifted_fields.join(", ")
                ));
            }
        }
        let mut o = if drifted.is_empty() {
            Outcome::done(
                result::REFRESH_AND_NO_DRIFT,
                "Live state matches - no drift detected",
            )
        } else {
            let mut o = Outcome::done(
                result::REFRESH_AND_DRIFTED,
                format!("drift: {}", drifted.join("; ")),
            );
            // The configuration stays ConfigHub's: hand back what it sent,
            // unchanged (the agents heal or report the drift).
            o.data = r.detail.data.clone().into_bytes();
            o
        };
        o.resources = rollup(&view.cells, view.unit.head);
        o
    }

    /// The revision an earlier run of this operation committed, if any.
    async fn committed_by(&self, unit: &UnitRef, op: &str) -> RevisionNum {
        let needle = format!("op {op}");
        match self.hub.unit_history(unit).await {
            Ok(revs) => revs
                .iter()
                .rev()
                .find(|r| r.origin.ends_with(&needle))
                .map_or(RevisionNum(0), |r| r.number),
            Err(_) => RevisionNum(0),
        }
    }

    /// Waits until every cluster of the unit's environment reports
    /// `revision` in `want` (Ready, or Destroyed); a failure, a stuck
    /// resource or the wait timeout ends it otherwise.
    pub(super) async fn wait(
        &self,
        op: &SourceOperation,
        r: &Running,
        unit: &UnitRef,
        revision: RevisionNum,
        want: Phase,
    ) -> Outcome {
        let d = &r.detail;
        let destroy = want == Phase::Destroyed;
        let (done, failed, timed_out) = if destroy {
            (
                result::DESTROY_COMPLETED,
                result::DESTROY_FAILED,
                result::DESTROY_WAIT_FAILED,
            )
        } else {
            (
                result::APPLY_COMPLETED,
                result::APPLY_FAILED,
                result::APPLY_WAIT_FAILED,
            )
        };
        // From the operation's start, across restarts and reconnects.
        let elapsed =
            Duration::from_millis(u64::try_from(UnixMillis::now().0 - d.started_ms).unwrap_or(0));
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(d.wait_seconds.max(1)).saturating_sub(if d.started_ms > 0 {
                elapsed
            } else {
                Duration::ZERO
            });
        let mut changes = self.hub.subscribe();
        let mut last_said = String::new();
        let mut last_progress = tokio::time::Instant::now() - PROGRESS_EVERY;
        loop {
            let clusters = match self.hub.list_clusters(Some(&unit.env)).await {
                // A revoked cluster never reports again: it does not count.
                Ok(c) => c
                    .into_iter()
                    .filter(|(c, _)| !c.revoked)
                    .map(|(c, _)| c.name)
                    .collect::<Vec<_>>(),
                Err(e) => return Outcome::failed(failed, e.to_string()),
            };
            let cells = match self.hub.unit_cells(unit).await {
                Ok(cells) => cells,
                Err(e) => return Outcome::failed(failed, e.to_string()),
            };
            let verdict = judge(&clusters, &cells, revision, want);
            // Only an outcome carries the resources.
            let resources = || rollup(&cells, revision);
            match &verdict {
                Verdict::Done => {
                    let mut o = Outcome::done(
                        done,
                        format!(
                            "{unit} revision {revision} {} in all {} cluster(s) of {}",
                            if destroy { "destroyed" } else { "Ready" },
                            clusters.len(),
                            unit.env
                        ),
                    );
                    o.resources = resources();
                    return o;
                }
                Verdict::Failed(problems) => {
                    let mut o =
                        Outcome::failed(failed, format!("failed in {}", problems.join("; ")));
                    o.errors = problems.clone();
                    o.resources = resources();
                    return o;
                }
                Verdict::Stuck(problems) if !destroy => {
                    let mut o = Outcome::failed(
                        self.config.stuck_result.as_str(),
                        format!("stuck in {}", problems.join("; ")),
                    );
                    o.errors = problems.clone();
                    o.resources = resources();
                    return o;
                }
                Verdict::Waiting(summary) | Verdict::Stuck(summary) => {
                    let said = summary.join("; ");
                    if said != last_said && last_progress.elapsed() >= PROGRESS_EVERY {
                        self.progress(op, r, result::NONE, &said).await;
                        last_said = said;
                        last_progress = tokio::time::Instant::now();
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                let mut o = Outcome::failed(
                    timed_out,
                    format!(
                        "not {} in every cluster within {}s: {last_said}",
                        if destroy { "destroyed" } else { "Ready" },
                        d.wait_seconds
                    ),
                );
                o.resources = resources();
                return o;
            }
            // Until a status changes (or a while passes: other replicas'
            // agents, missed notices), the deadline, or an end from outside.
            let recheck = tokio::time::Instant::now() + RECHECK;
            loop {
                tokio::select! {
                    () = r.cancel.cancelled() => return Outcome::done(result::NONE, "ended"),
                    () = tokio::time::sleep_until(deadline.min(recheck)) => break,
                    c = changes.recv() => match c {
                        Ok(e) if !e.touches(unit) => {}
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => {
                            tokio::time::sleep_until(deadline.min(recheck)).await;
                            break;
                        }
                    },
                }
            }
        }
    }
}

/// The report of an ending asked for while the operation committed (a
/// cancel, a newer operation): as asked, saying what the commit did (a
/// committed revision rolls out; it is not waited for).
fn held_ending(
    held: Option<(&'static str, String)>,
    unit: &UnitRef,
    committed: Option<RevisionNum>,
) -> Option<Outcome> {
    let (status, why) = held?;
    let mut o = Outcome::done(
        result::NONE,
        match committed {
            Some(rev) => format!(
                "{why}; it came while {unit} was committed as revision {rev}, which rolls out to every cluster of {} (not waited for)",
                unit.env
            ),
            None => format!("{why}; nothing was committed"),
        },
    );
    o.status = status;
    Some(match committed {
        Some(rev) => o.with_bridge(unit, rev),
        None => o,
    })
}
