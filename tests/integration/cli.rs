//! The operator CLI end to end: the real `unitsync` binary serving, and the
//! real binary as client, with simulated agents reporting status.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::io::AsyncBufReadExt;
use unitsync_agent::hub_client::StatusUpdate;
use unitsync_tests::{SimAgent, configmap, until, within};

/// The `unitsync` binary built next to this test binary.
fn unitsync_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("unitsync");
    assert!(
        bin.exists(),
        "{} is missing: build the binaries first (cargo build --workspace --bins)",
        bin.display()
    );
    bin
}

struct Served {
    child: KillOnDrop,
    endpoint: String,
    data_dir: PathBuf,
    /// The hub's generated CA (PEM).
    ca: String,
    /// Every line the hub logged.
    logs: Arc<Mutex<Vec<String>>>,
    /// Its log filter (kept across restarts).
    filter: String,
    _dir: tempfile::TempDir,
}

/// A child process killed (and reaped) when the test ends, passed or not.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `unitsync serve` on a free port and reads the address it logged.
async fn serve() -> Served {
    serve_with_log("info").await
}

/// Same, with a log filter; every log line is kept in `Served::logs`.
async fn serve_with_log(filter: &str) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let logs: Arc<Mutex<Vec<String>>> = Arc::default();
    let (child, addr) = spawn_hub("127.0.0.1:0", &data_dir, filter, &logs).await;
    let ca = std::fs::read_to_string(data_dir.join("ca.crt")).expect("the hub wrote its CA");
    Served {
        child: KillOnDrop(child),
        endpoint: format!("https://{addr}"),
        data_dir,
        ca,
        logs,
        filter: filter.to_owned(),
        _dir: dir,
    }
}

/// Starts `unitsync serve` listening on `listen`, keeping its log lines in
/// `logs`; the child and the address it logged.
async fn spawn_hub(
    listen: &str,
    data_dir: &Path,
    filter: &str,
    logs: &Arc<Mutex<Vec<String>>>,
) -> (Child, String) {
    let mut child = Command::new(unitsync_bin())
        .args([
            "serve",
            "--listen",
            listen,
            "--no-http",
            "--log-format",
            "json",
            "--heartbeat-seconds",
            "2",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env("UNITSYNC_LOG", filter)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = tokio::process::ChildStderr::from_std(child.stderr.take().unwrap()).unwrap();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let addr = within("hub logs its address", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            logs.lock().unwrap().push(line.clone());
            let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
            if let Some(a) = v["fields"]["grpc_addr"].as_str() {
                return a.to_owned();
            }
        }
        panic!("hub exited before listening");
    })
    .await;
    // Keep draining the log so the hub never blocks on a full pipe.
    let kept = logs.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            kept.lock().unwrap().push(line);
        }
    });
    (child, addr)
}

impl Served {
    /// Kills the hub (SIGKILL) and starts it again on the same address and
    /// data directory.
    async fn restart(&mut self) {
        self.kill();
        self.start_again().await;
    }

    /// Kills the hub (SIGKILL) and reaps it.
    fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }

    /// Starts the hub again (after [`Served::kill`]) on its address and
    /// data directory.
    async fn start_again(&mut self) {
        let addr = self.endpoint.trim_start_matches("https://").to_owned();
        let (child, again) = spawn_hub(&addr, &self.data_dir, &self.filter, &self.logs).await;
        self.child = KillOnDrop(child);
        assert_eq!(again, addr, "the hub came back on another address");
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(unitsync_bin());
        c.env("UNITSYNC_HUB", &self.endpoint)
            .env("UNITSYNC_DATA_DIR", &self.data_dir)
            .env_remove("UNITSYNC_TOKEN");
        c
    }

    async fn run(&self, args: &[&str]) -> Output {
        let mut c = self.cmd();
        c.args(args);
        within(
            &format!("unitsync {}", args.join(" ")),
            tokio::task::spawn_blocking(move || c.output().unwrap()),
        )
        .await
        .unwrap()
    }

    /// Runs a command in the background; its output once it exits.
    fn background(&self, args: &[&str]) -> tokio::task::JoinHandle<Output> {
        let mut c = self.cmd();
        c.args(args);
        tokio::task::spawn_blocking(move || c.output().unwrap())
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args).await;
        assert!(
            out.status.success(),
            "unitsync {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[tokio::test]
async fn operator_cli_end_to_end() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    hub.ok(&["env", "create", "dev"]).await;
    hub.ok(&["env", "create", "prod"]).await;
    hub.ok(&["env", "create", "staging", "--after", "dev"])
        .await;
    let envs: serde_json::Value =
        serde_json::from_str(&hub.ok(&["env", "list", "-o", "json"]).await).unwrap();
    let order: Vec<&str> = envs
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["dev", "staging", "prod"]);

    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&[
            "cluster",
            "create",
            "dev-1",
            "--env",
            "dev",
            "--label",
            "region=eu",
            "-o",
            "json",
        ])
        .await,
    )
    .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("usk_agent_"));
    let mut agent = SimAgent::new(&hub.endpoint, Some(&hub.ca), &token).auto_ready();
    agent.start();

    // create --wait returns once the cluster reports Ready.
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    hub.ok(&[
        "unit",
        "create",
        "dev/web",
        "-f",
        &v1,
        "-m",
        "first",
        "--wait",
        "--timeout",
        "30",
    ])
    .await;
    let v2 = write(files.path(), "v2.yaml", &configmap("web", "2"));
    hub.ok(&[
        "unit",
        "update",
        "dev/web",
        "-f",
        &v2,
        "-m",
        "second",
        "--wait",
        "--timeout",
        "30",
    ])
    .await;
    assert_eq!(agent.held().get("web"), Some(&(2, false)));

    let history: serde_json::Value =
        serde_json::from_str(&hub.ok(&["unit", "history", "dev/web", "-o", "json"]).await).unwrap();
    let msgs: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(msgs, ["first", "second"]);
    let yaml = hub.ok(&["unit", "history", "dev/web", "-o", "yaml"]).await;
    assert!(yaml.contains("message: second"), "{yaml}");

    let diff = hub.ok(&["unit", "diff", "dev/web"]).await;
    assert!(
        diff.contains("-  value: \"1\"") && diff.contains("+  value: \"2\""),
        "{diff}"
    );

    let status = hub.ok(&["status"]).await;
    let row = status
        .lines()
        .find(|l| l.starts_with("dev/web"))
        .unwrap_or_default();
    assert!(row.contains("2 Ready"), "{status}");
    let table = hub.ok(&["cluster", "list"]).await;
    assert!(
        table.contains("dev-1") && table.contains("yes") && table.contains("region=eu"),
        "{table}"
    );

    // Stdin works too, and a bad manifest fails with the document and field.
    let mut c = hub.cmd();
    c.args(["unit", "update", "dev/web", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = within(
        "stdin update",
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = c.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Bad\n")
                .unwrap();
            child.wait_with_output().unwrap()
        }),
    )
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unit dev/web, document 1 (line 1), field metadata.name"),
        "{err}"
    );

    hub.ok(&["unit", "destroy", "dev/web", "--wait", "--timeout", "30"])
        .await;
    let audit = hub.ok(&["audit", "--target", "dev/web"]).await;
    assert!(
        audit.contains("unit.destroy") && audit.contains("operator:admin"),
        "{audit}"
    );
    hub.ok(&["cluster", "delete", "dev-1"]).await;
    let out = hub.run(&["cluster", "get", "dev-1"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster dev-1 not found"));
    agent.stop().await;
}

/// `unit VERB dev/web -f FILE --wait`, for longer than any test waits.
fn waiting_on<'a>(verb: &'a str, file: &'a str) -> [&'a str; 8] {
    [
        "unit",
        verb,
        "dev/web",
        "-f",
        file,
        "--wait",
        "--timeout",
        "600",
    ]
}

/// `web` Ready at `revision`, as the simulated agent reports it.
fn ready_at(revision: u64) -> StatusUpdate {
    StatusUpdate {
        unit: "web".into(),
        revision,
        phase: unitsync_agent::status::Phase::Ready,
        message: String::new(),
        resources: vec![],
    }
}

/// Environment `dev` with one cluster, `dev-1`, whose simulated agent is
/// running and reports only what the test tells it to.
async fn one_cluster(hub: &Served) -> SimAgent {
    hub.ok(&["env", "create", "dev"]).await;
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&["cluster", "create", "dev-1", "--env", "dev", "-o", "json"])
            .await,
    )
    .unwrap();
    let mut agent = SimAgent::new(
        &hub.endpoint,
        Some(&hub.ca),
        created["token"].as_str().unwrap(),
    );
    agent.start();
    agent
}

#[tokio::test]
async fn wait_fails_with_the_failing_clusters_message() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut agent = one_cluster(&hub).await;
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    let waiting = hub.background(&[
        "unit",
        "create",
        "dev/web",
        "-f",
        &v1,
        "--wait",
        "--timeout",
        "60",
    ]);
    until("agent received web", || async {
        agent.held().contains_key("web")
    })
    .await;
    agent.report(StatusUpdate {
        unit: "web".into(),
        revision: 1,
        phase: unitsync_agent::status::Phase::Failed,
        message: "Deployment web: ProgressDeadlineExceeded".into(),
        resources: vec![],
    });
    let out = within("wait exits", waiting).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dev-1: Failed Deployment web: ProgressDeadlineExceeded"),
        "{err}"
    );

    // Timeout: nobody reports for revision 2.
    agent.stop().await;
    let v2 = write(files.path(), "v2.yaml", &configmap("web", "2"));
    let out = hub
        .run(&[
            "unit",
            "update",
            "dev/web",
            "-f",
            &v2,
            "--wait",
            "--timeout",
            "1",
        ])
        .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out after 1s") && err.contains("dev-1: agent not connected"),
        "{err}"
    );
}

#[tokio::test]
async fn wait_stops_when_a_later_commit_supersedes_the_revision() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut agent = one_cluster(&hub).await;
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    hub.ok(&["unit", "create", "dev/web", "-f", &v1]).await;
    // Waits for revision 2 (far longer than the test's deadline).
    let v2 = write(files.path(), "v2.yaml", &configmap("web", "2"));
    let waiting = hub.background(&waiting_on("update", &v2));
    until("agent received web@2", || async {
        agent.held().get("web") == Some(&(2, false))
    })
    .await;
    // Another pipeline commits revision 3 before 2 was Ready; the cluster
    // applies it.
    let v3 = write(files.path(), "v3.yaml", &configmap("web", "3"));
    hub.ok(&["unit", "update", "dev/web", "-f", &v3]).await;
    until("agent received web@3", || async {
        agent.held().get("web") == Some(&(3, false))
    })
    .await;
    agent.report(ready_at(3));
    let out = within("wait exits", waiting).await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("dev/web@2 was superseded before it was Ready in every cluster (0/1 were)")
            && err.contains("dev-1: at revision 3"),
        "{err}"
    );
    agent.stop().await;
}

/// A `unitsync` run in the background, one of its outputs read line by
/// line; every line read is kept for the failure message.
struct Reading {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<Box<dyn tokio::io::AsyncRead + Unpin + Send>>>,
    said: Vec<String>,
}

impl Reading {
    /// `unitsync ARGS`, reading its stderr (where `--wait` reports).
    fn stderr(hub: &Served, args: &[&str]) -> Reading {
        Self::spawn(hub, args, false)
    }

    /// `unitsync ARGS`, reading its stdout.
    fn stdout(hub: &Served, args: &[&str]) -> Reading {
        Self::spawn(hub, args, true)
    }

    fn spawn(hub: &Served, args: &[&str], stdout: bool) -> Reading {
        let (piped, null) = (Stdio::piped, Stdio::null);
        let mut cmd = tokio::process::Command::from(hub.cmd());
        cmd.args(args)
            .stdout(if stdout { piped() } else { null() })
            .stderr(if stdout { null() } else { piped() })
            .kill_on_drop(true);
        let mut child = cmd.spawn().unwrap();
        let out: Box<dyn tokio::io::AsyncRead + Unpin + Send> = match stdout {
            true => Box::new(child.stdout.take().unwrap()),
            false => Box::new(child.stderr.take().unwrap()),
        };
        Reading {
            child,
            lines: tokio::io::BufReader::new(out).lines(),
            said: Vec::new(),
        }
    }

    /// Reads until a line `matches`; fails naming what was said if the
    /// output ends first or the deadline passes.
    async fn until(&mut self, what: &str, matches: impl Fn(&str) -> bool) {
        let (lines, said) = (&mut self.lines, &mut self.said);
        let read = tokio::time::timeout(unitsync_tests::DEADLINE, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let found = matches(&line);
                said.push(line);
                if found {
                    return true;
                }
            }
            false
        })
        .await;
        assert!(read == Ok(true), "no line {what}; said {said:#?}");
    }

    /// Reads until a line starts with `prefix`.
    async fn until_starting(&mut self, prefix: &str) {
        self.until(&format!("starting {prefix:?}"), |l| l.starts_with(prefix))
            .await;
    }

    /// Reads the rest of the output; all that was said.
    async fn rest(&mut self) -> String {
        let (lines, said) = (&mut self.lines, &mut self.said);
        within("the rest of the output", async {
            while let Some(line) = lines.next_line().await.unwrap() {
                said.push(line);
            }
        })
        .await;
        said.join("\n")
    }

    /// Waits for the run to exit.
    async fn exit(&mut self) -> std::process::ExitStatus {
        within("the run exits", self.child.wait()).await.unwrap()
    }
}

/// Stops the hub with SIGTERM, as Kubernetes stops a pod, and reaps it.
async fn terminate(hub: &mut Served) {
    let pid = hub.child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let child = &mut hub.child.0;
    until("the hub exits", || {
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        async move { exited }
    })
    .await;
}

#[tokio::test]
async fn a_wait_outlives_hub_restarts() {
    let mut hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut agent = one_cluster(&hub).await;

    // Stopped (SIGTERM) and started again: the wait says it lost the hub,
    // reopens the watch and ends when the cluster is Ready.
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    let mut waiting = Reading::stderr(&hub, &waiting_on("create", &v1));
    waiting
        .until_starting("dev/web@1: 0/1 clusters Ready")
        .await;
    terminate(&mut hub).await;
    waiting
        .until_starting("lost the hub (the hub is shutting down); reconnecting")
        .await;
    hub.restart().await;
    until("the agent is back", || async { agent.connections() >= 2 }).await;
    agent.report(ready_at(1));
    waiting
        .until_starting("dev/web@1: 1/1 clusters Ready")
        .await;
    assert!(waiting.exit().await.success(), "{:?}", waiting.said);

    // Killed (SIGKILL: the connection breaks) and started again.
    let v2 = write(files.path(), "v2.yaml", &configmap("web", "2"));
    let mut waiting = Reading::stderr(&hub, &waiting_on("update", &v2));
    waiting
        .until_starting("dev/web@2: 0/1 clusters Ready")
        .await;
    hub.restart().await;
    waiting.until_starting("lost the hub (").await;
    until("the agent holds web@2 again", || async {
        agent.connections() >= 3 && agent.held().get("web") == Some(&(2, false))
    })
    .await;
    agent.report(ready_at(2));
    assert!(waiting.exit().await.success(), "{:?}", waiting.said);

    // Gone for good: the wait ends at its timeout, saying what it waited
    // for and that the hub is out of reach.
    let v3 = write(files.path(), "v3.yaml", &configmap("web", "3"));
    let mut waiting = Reading::stderr(
        &hub,
        &[
            "unit",
            "update",
            "dev/web",
            "-f",
            &v3,
            "--wait",
            "--timeout",
            "8",
        ],
    );
    waiting
        .until_starting("dev/web@3: 0/1 clusters Ready")
        .await;
    terminate(&mut hub).await;
    let err = waiting.rest().await;
    assert!(!waiting.exit().await.success());
    assert!(
        err.contains("timed out after 8s waiting for dev/web@3 (the hub is out of reach: ")
            && err.contains("not Ready yet:\n  dev-1: "),
        "{err}"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_status_after_a_restart_counts_although_the_clock_ran_behind() {
    use sqlx::Connection;
    let mut hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut agent = one_cluster(&hub).await;
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    let mut waiting = Reading::stderr(&hub, &waiting_on("create", &v1));
    waiting
        .until_starting("dev/web@1: 0/1 clusters Ready (dev-1: ")
        .await;
    agent.report(StatusUpdate {
        phase: unitsync_agent::status::Phase::Progressing,
        ..ready_at(1)
    });
    waiting
        .until_starting("dev/web@1: 0/1 clusters Ready (dev-1: Progressing)")
        .await;
    // The hub that recorded it had a clock an hour ahead of the one that
    // starts next (a node's clock, or a step back of this one's).
    hub.kill();
    let url = format!("sqlite://{}", hub.data_dir.join("hub.db").display());
    let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
    let moved = sqlx::query("UPDATE unit_status SET updated_at = updated_at + 3600000")
        .execute(&mut db)
        .await
        .unwrap();
    assert_eq!(moved.rows_affected(), 1);
    db.close().await.unwrap();
    hub.start_again().await;
    // The wait is back on the hub and holds its snapshot (Progressing, an
    // hour "later" than now) before the agent says more.
    waiting.until_starting("lost the hub (").await;
    waiting
        .until_starting("dev/web@1: 0/1 clusters Ready (dev-1: Progressing")
        .await;
    until("the agent is back", || async { agent.connections() >= 2 }).await;
    // Ready, received after the restart: newer than Progressing although
    // the wall clock says otherwise. The wait ends.
    agent.report(ready_at(1));
    waiting
        .until_starting("dev/web@1: 1/1 clusters Ready")
        .await;
    assert!(waiting.exit().await.success(), "{:?}", waiting.said);
    agent.stop().await;
}

#[tokio::test]
async fn status_watch_outlives_a_hub_restart() {
    let mut hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut agent = one_cluster(&hub).await;
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    hub.ok(&["unit", "create", "dev/web", "-f", &v1]).await;
    let mut watching = Reading::stdout(&hub, &["status", "--watch"]);
    watching
        .until("with dev/web", |l| l.contains("dev/web"))
        .await;
    hub.restart().await;
    watching.until_starting("--- lost the hub (").await;
    until("the agent is back", || async { agent.connections() >= 2 }).await;
    agent.report(ready_at(1));
    watching
        .until("with dev/web at 1 Ready", |l| {
            l.contains("dev/web") && l.contains("1 Ready")
        })
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn a_wait_follows_clusters_deleted_while_it_waits() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let mut ready = one_cluster(&hub).await;
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&["cluster", "create", "dev-2", "--env", "dev", "-o", "json"])
            .await,
    )
    .unwrap();
    let token = created["token"].as_str().unwrap();
    let mut silent = SimAgent::new(&hub.endpoint, Some(&hub.ca), token);
    silent.start();
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    let waiting = hub.background(&waiting_on("create", &v1));
    until("both agents received web@1", || async {
        ready.held().contains_key("web") && silent.held().contains_key("web")
    })
    .await;
    ready.report(ready_at(1));
    // dev-2 never reports; once it is deleted (its agent connected), every
    // cluster left is Ready and the wait succeeds.
    hub.ok(&["cluster", "delete", "dev-2"]).await;
    let out = within("wait exits", waiting).await.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("dev/web@1: 1/1 clusters Ready"), "{err}");
    ready.stop().await;
    silent.stop().await;
}

#[tokio::test]
async fn agent_install_with_secret_issues_a_fresh_per_cluster_token() {
    let hub = serve().await;
    hub.ok(&["env", "create", "dev"]).await;
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&["cluster", "create", "dev-1", "--env", "dev", "-o", "json"])
            .await,
    )
    .unwrap();
    let old = created["token"].as_str().unwrap().to_owned();
    let yaml = hub
        .ok(&["agent", "install", "dev-1", "--export", "--include-secret"])
        .await;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
    let secret = docs
        .iter()
        .find(|d| d["kind"] == "Secret")
        .expect("Secret included");
    assert_eq!(secret["metadata"]["name"], "unitsync-agent-dev-1");
    let new = secret["stringData"]["token"].as_str().unwrap().to_owned();
    assert!(new.starts_with("usk_agent_") && new != old);
    // The new token works, the old one no longer does.
    let stop = tokio_util::sync::CancellationToken::new();
    let refused = within(
        "old token",
        SimAgent::new(&hub.endpoint, Some(&hub.ca), &old).session_once(&stop),
    )
    .await;
    assert!(
        matches!(refused, Err(unitsync_agent::hub_client::SessionError::Refused(s)) if s.code() == tonic::Code::Unauthenticated)
    );
    let mut agent = SimAgent::new(&hub.endpoint, Some(&hub.ca), &new);
    agent.start();
    until("connected with the new token", || async {
        hub.ok(&["cluster", "get", "dev-1", "-o", "json"])
            .await
            .contains("\"connected\": true")
    })
    .await;
    agent.stop().await;
    // --export-secret-only prints just the Secret.
    let only = hub
        .ok(&["agent", "install", "dev-1", "--export-secret-only"])
        .await;
    let kinds: Vec<String> = serde_saphyr::from_multiple::<serde_json::Value>(&only)
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(kinds, ["Secret"]);
    let audit = hub.ok(&["audit", "--target", "cluster/dev-1"]).await;
    assert!(audit.contains("cluster.token"), "{audit}");
}

/// No secret value (tokens, keys, Secret data in units) appears in any log
/// line at any level, error message or status: a canary runs through the
/// real hub and agent binaries at TRACE level.
#[tokio::test]
async fn secrets_never_reach_logs_errors_or_status() {
    const CANARY: &str = "canary-7f3a9c1e5b";
    let hub = serve_with_log("trace").await;
    let files = tempfile::tempdir().unwrap();
    hub.ok(&["env", "create", "dev"]).await;
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&["cluster", "create", "dev-1", "--env", "dev", "-o", "json"])
            .await,
    )
    .unwrap();
    let token = created["token"].as_str().unwrap().to_owned();
    let token_file = write(files.path(), "token", &token);
    let cert_dir = files.path().join("cert");
    hub.ok(&[
        "cluster",
        "certificate",
        "dev-1",
        "--out",
        cert_dir.to_str().unwrap(),
    ])
    .await;
    let cert_key = std::fs::read_to_string(cert_dir.join("tls.key")).unwrap();
    let key_line = cert_key.lines().nth(1).unwrap().to_owned();

    // A real cluster and the real agent binary at TRACE.
    unitsync_tests::cluster::init_crypto();
    let sim =
        unitsync_tests::kube_sim::KubeSim::start(unitsync_tests::kube_sim::SimOptions::default())
            .await
            .unwrap();
    let kubeconfig = write(files.path(), "kubeconfig", &sim.kubeconfig("sim"));
    let agent_bin = unitsync_bin().with_file_name("unitsync-agent");
    let agent_log = files.path().join("agent.log");
    let agent = Command::new(agent_bin)
        .args([
            "--hub",
            &hub.endpoint,
            "--token-file",
            &token_file,
            "--kubeconfig",
            &kubeconfig,
        ])
        .arg("--ca-file")
        .arg(hub.data_dir.join("ca.crt"))
        .arg("--state-dir")
        .arg(files.path().join("state"))
        .env("UNITSYNC_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&agent_log).unwrap())
        .spawn()
        .unwrap();
    let agent = KillOnDrop(agent);

    let secret = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: db\n  namespace: apps\nstringData:\n  password: {CANARY}\n"
    );
    let unit = write(files.path(), "unit.yaml", &secret);
    let out = hub
        .run(&[
            "unit",
            "create",
            "dev/db",
            "-f",
            &unit,
            "--wait",
            "--timeout",
            "60",
        ])
        .await;
    // A rejected manifest holding the canary, and a failing apply.
    let bad = write(
        files.path(),
        "bad.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: x\nstringData:\n  password: [{CANARY}, \n"
        ),
    );
    let rejected = hub.run(&["unit", "update", "dev/db", "-f", &bad]).await;
    assert!(!rejected.status.success());
    let unnamespaced = write(
        files.path(),
        "nons.yaml",
        &format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: loose\nstringData:\n  password: {CANARY}\n"
        ),
    );
    hub.ok(&["unit", "create", "dev/loose", "-f", &unnamespaced])
        .await;
    until("the failing unit reports", || async {
        hub.ok(&["unit", "get", "dev/loose", "-o", "json"])
            .await
            .contains("Failed")
    })
    .await;
    let status = hub.ok(&["status", "-o", "json"]).await
        + &hub.ok(&["unit", "get", "dev/db", "-o", "yaml"]).await
        + &hub.ok(&["unit", "get", "dev/loose", "-o", "yaml"]).await;
    let audit = hub.ok(&["audit", "-o", "json"]).await;
    drop(agent);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hub_logs = hub.logs.lock().unwrap().join("\n");
    let agent_logs = std::fs::read_to_string(&agent_log).unwrap();
    assert!(
        hub_logs.lines().count() > 20 && agent_logs.lines().count() > 20,
        "trace logs were captured"
    );
    let admin = std::fs::read_to_string(hub.data_dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned();
    let places = [
        ("hub log", hub_logs.as_str()),
        ("agent log", agent_logs.as_str()),
        ("status", status.as_str()),
        ("audit", audit.as_str()),
        ("rejection", &String::from_utf8_lossy(&rejected.stderr)),
        ("create output", &String::from_utf8_lossy(&out.stdout)),
    ];
    for (what, text) in places {
        for (secret, name) in [
            (CANARY, "Secret data"),
            (token.as_str(), "agent token"),
            (admin.as_str(), "admin token"),
            (key_line.as_str(), "client key"),
        ] {
            assert!(!text.contains(secret), "{name} leaked into the {what}");
        }
    }
    // The data did reach the cluster.
    assert_eq!(
        sim.object("v1", "secrets", "apps", "db").unwrap()["stringData"]["password"],
        CANARY
    );
}

#[tokio::test]
async fn promotion_through_the_cli() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    hub.ok(&["env", "create", "dev"]).await;
    hub.ok(&["env", "create", "staging", "--approvals", "1"])
        .await;
    // Created with its gate in one step: never an ungated moment, one
    // audit entry saying so.
    let audit: Vec<serde_json::Value> = serde_json::from_str(
        &hub.ok(&["audit", "--target", "env/staging", "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(audit[0]["action"], "environment.create", "{audit:?}");
    assert!(
        audit[0]["detail"].as_str().unwrap().contains("approvals 1"),
        "{audit:?}"
    );
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&["cluster", "create", "dev-1", "--env", "dev", "-o", "json"])
            .await,
    )
    .unwrap();
    let mut agent = SimAgent::new(
        &hub.endpoint,
        Some(&hub.ca),
        created["token"].as_str().unwrap(),
    )
    .auto_ready();
    agent.start();
    let v1 = write(files.path(), "v1.yaml", &configmap("web", "1"));
    hub.ok(&[
        "unit",
        "create",
        "dev/web",
        "-f",
        &v1,
        "--wait",
        "--timeout",
        "30",
    ])
    .await;
    // Linking needs the gates too: one approval.
    let out = hub
        .run(&["unit", "create", "staging/web", "--from", "dev/web"])
        .await;
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr)
                .contains("gate approvals failed: 0 of 1 approvals"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without --revision: the head at the time, which the answer names.
    let approved = hub.ok(&["approve", "dev/web", "--for", "staging"]).await;
    assert!(
        approved.contains("dev/web@1 approved for staging: 1 of 1 approvals"),
        "{approved}"
    );
    hub.ok(&["unit", "create", "staging/web", "--from", "dev/web"])
        .await;
    let status = hub.ok(&["status"]).await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("staging/web") && l.contains("= dev/web@1")),
        "{status}"
    );

    let overrides = write(
        files.path(),
        "o.yaml",
        "- kind: ConfigMap\n  name: web\n  namespace: apps\n  path: data.value\n  value: staging\n",
    );
    hub.ok(&["unit", "override", "staging/web", "-f", &overrides])
        .await;
    let v2 = write(
        files.path(),
        "v2.yaml",
        &configmap("web", "1").replace("apps\n", "apps\n  labels: {tier: web}\n"),
    );
    hub.ok(&[
        "unit",
        "update",
        "dev/web",
        "-f",
        &v2,
        "--wait",
        "--timeout",
        "30",
    ])
    .await;
    let status = hub.ok(&["status"]).await;
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("staging/web") && l.contains("pending dev/web@2 (has @1)")),
        "{status}"
    );
    // The dry run shows the diff and the blocking gate.
    let out = hub
        .run(&[
            "promote",
            "--from",
            "dev",
            "--to",
            "staging",
            "web",
            "--dry-run",
        ])
        .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success()
            && text.contains("+    tier: web")
            && text.contains("gate approvals FAILED: 0 of 1 approvals"),
        "{text}"
    );
    // As JSON: the whole answer, gates as fields.
    let out = hub
        .run(&[
            "promote",
            "--from",
            "dev",
            "--to",
            "staging",
            "web",
            "--dry-run",
            "-o",
            "json",
        ])
        .await;
    assert!(!out.status.success());
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&plan["blocked"], &plan["promotion_id"]),
        (&json!(true), &json!(null)),
        "{plan}"
    );
    assert!(
        plan["items"][0]["gates"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["gate"] == "approvals" && g["passed"] == false),
        "{plan}"
    );
    hub.ok(&["approve", "dev/web", "--for", "staging"]).await;
    let out = hub
        .ok(&[
            "promote", "--from", "dev", "--to", "staging", "--all", "-o", "json",
        ])
        .await;
    let promoted: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        promoted["message"]
            .as_str()
            .unwrap()
            .contains("dev/web@2 -> staging/web: promoted as revision 2"),
        "{out}"
    );
    let head = hub.ok(&["unit", "get", "staging/web", "--manifests"]).await;
    assert!(
        head.contains("value: staging") && head.contains("tier: web"),
        "override kept: {head}"
    );
    let promotions = hub.ok(&["promotion", "list", "-o", "json"]).await;
    let list: serde_json::Value = serde_json::from_str(&promotions).unwrap();
    let id = list[0]["id"].as_u64().unwrap();
    assert_eq!(
        promoted["promotion_id"], id,
        "the promotion's id, to undo it"
    );
    hub.ok(&["promotion", "rollback", &id.to_string()]).await;
    hub.ok(&["unit", "rollback", "dev/web", "--to", "1"]).await;
    let history = hub.ok(&["unit", "history", "dev/web", "-o", "json"]).await;
    assert!(history.contains("rollback to 1"), "{history}");
    // `env policy` changes what its flags name and keeps the rest.
    hub.ok(&["env", "policy", "staging", "--soak", "5"]).await;
    let envs: serde_json::Value =
        serde_json::from_str(&hub.ok(&["env", "list", "-o", "json"]).await).unwrap();
    let staging = envs
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "staging")
        .unwrap();
    assert_eq!(
        (&staging["required_approvals"], &staging["soak_seconds"]),
        (&serde_json::json!(1), &serde_json::json!(5)),
        "{staging}"
    );
    let audit = hub.ok(&["audit"]).await;
    for action in [
        "promotion.approve",
        "unit.overrides",
        "promotion.rollback",
        "environment.policy",
    ] {
        assert!(audit.contains(action), "{action} audited: {audit}");
    }
    agent.stop().await;
}

#[tokio::test]
async fn operator_tokens_print_as_json_and_oversized_units_are_refused_before_sending() {
    let hub = serve().await;
    let files = tempfile::tempdir().unwrap();
    let created: serde_json::Value = serde_json::from_str(
        &hub.ok(&[
            "operator",
            "create",
            "alice",
            "--role",
            "read-only",
            "-o",
            "json",
        ])
        .await,
    )
    .expect("JSON output");
    assert_eq!(created["name"], "alice");
    assert_eq!(created["role"], "read-only");
    assert!(created["token"].as_str().unwrap().starts_with("usk_op_"));
    let again = hub.run(&["operator", "create", "alice"]).await;
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("operator alice already exists"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let rotated: serde_json::Value =
        serde_json::from_str(&hub.ok(&["operator", "rotate", "alice", "-o", "json"]).await)
            .unwrap();
    assert_ne!(rotated["token"], created["token"]);
    hub.ok(&["env", "create", "dev"]).await;
    // A source's registry CA is its own flag: the hub's CA (`--ca-file`,
    // global) still verifies the hub.
    let other_ca = {
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap();
        write(files.path(), "other-ca.pem", &ca.pem())
    };
    let created = hub
        .run(&[
            "source",
            "create",
            "web",
            "--env",
            "dev",
            "--oci",
            "oci://127.0.0.1:9/web",
            "--tag",
            "latest",
            "--registry-ca-file",
            &other_ca,
        ])
        .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let big = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: big\n  namespace: apps\ndata:\n  x: \"{}\"\n",
        "x".repeat(5 * 1024 * 1024)
    );
    let path = write(files.path(), "big.yaml", &big);
    let out = hub.run(&["unit", "create", "dev/big", "-f", &path]).await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unit dev/big: the manifests are") && err.contains("a unit holds at most"),
        "{err}"
    );
}
