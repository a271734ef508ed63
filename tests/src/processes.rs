//! The real binaries as separate processes: `unitsync serve`, `kube-sim`
//! and `unitsync-agent`, each killable (SIGKILL) and restartable with the
//! same data, and the `unitsync` CLI as an operator runs it. Used by the
//! fault suite and the end-to-end benchmark.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};

/// A binary of this workspace, built next to the running executable (a
/// test binary in `target/debug/deps` or a tool in `target/debug`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current executable");
    let dir = exe.parent().expect("executable directory");
    for d in [dir, dir.parent().unwrap_or(dir)] {
        let p = d.join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "{name} is missing next to {}: build the binaries first (cargo build --workspace --bins)",
        exe.display()
    );
}

/// A free loopback port (bound and released; the caller binds it next).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Sends SIGKILL (or SIGTERM) to a child and reaps it.
async fn signal(child: &mut Child, sig: &str) {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
}

/// `unitsync serve` on fixed ports (so that it can be restarted in place).
pub struct HubProcess {
    pub data_dir: PathBuf,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub heartbeat_seconds: u64,
    /// More `serve` arguments (a ConfigHub worker's flags).
    pub extra_args: Vec<String>,
    /// Shared, so a test can kill the hub while others use it.
    child: tokio::sync::Mutex<Option<Child>>,
}

impl HubProcess {
    pub async fn start(data_dir: &Path, heartbeat_seconds: u64) -> anyhow::Result<HubProcess> {
        Self::start_with(data_dir, heartbeat_seconds, &[]).await
    }

    /// The same, with more `serve` arguments.
    pub async fn start_with(
        data_dir: &Path,
        heartbeat_seconds: u64,
        extra_args: &[&str],
    ) -> anyhow::Result<HubProcess> {
        let hub = HubProcess {
            data_dir: data_dir.to_owned(),
            grpc: SocketAddr::from(([127, 0, 0, 1], free_port())),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            heartbeat_seconds,
            extra_args: extra_args.iter().map(|a| (*a).to_owned()).collect(),
            child: tokio::sync::Mutex::new(None),
        };
        hub.restart().await?;
        Ok(hub)
    }

    /// (Re)starts the hub on the same ports and data; returns once it is ready.
    pub async fn restart(&self) -> anyhow::Result<()> {
        let child = Command::new(bin("unitsync"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &self.grpc.to_string()])
            .args(["--http-listen", &self.http.to_string()])
            .args(["--heartbeat-seconds", &self.heartbeat_seconds.to_string()])
            .args(&self.extra_args)
            .env("UNITSYNC_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start unitsync serve")?;
        *self.child.lock().await = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if http_get(self.http, "/readyz")
                .await
                .is_ok_and(|(s, _)| s == 200)
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the hub did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while it runs.
    pub async fn pid(&self) -> Option<u32> {
        self.child.lock().await.as_ref().and_then(Child::id)
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill(&self) {
        if let Some(mut c) = self.child.lock().await.take() {
            signal(&mut c, "-KILL").await;
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.grpc)
    }

    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("ca.crt")
    }

    /// Runs the `unitsync` CLI against this hub (admin token and CA from
    /// the data directory); returns stdout, or the error it printed.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        cli(&self.data_dir, &self.endpoint(), args).await
    }
}

/// The longest a CLI call may take (`--wait` included).
const CLI_DEADLINE: Duration = Duration::from_secs(180);

/// Runs `unitsync ARGS` as an operator would.
pub async fn cli(data_dir: &Path, hub: &str, args: &[&str]) -> anyhow::Result<String> {
    let run = Command::new(bin("unitsync"))
        .args(args)
        .args(["--hub", hub])
        .env("UNITSYNC_DATA_DIR", data_dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CLI_DEADLINE, run)
        .await
        .with_context(|| format!("unitsync {} did not finish", args.join(" ")))?
        .context("run unitsync")?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "unitsync {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// Runs `unitsync ARGS` with a manifest on standard input (`-f -`).
pub async fn cli_with_input(
    data_dir: &Path,
    hub: &str,
    args: &[&str],
    input: &str,
) -> anyhow::Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(bin("unitsync"))
        .args(args)
        .args(["--hub", hub])
        .env("UNITSYNC_DATA_DIR", data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("run unitsync")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(input.as_bytes()).await?;
    drop(stdin);
    let out = tokio::time::timeout(CLI_DEADLINE, child.wait_with_output())
        .await
        .with_context(|| format!("unitsync {} did not finish", args.join(" ")))??;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        bail!(
            "unitsync {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }
}

/// A minimal HTTP/1.1 GET on loopback: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http(addr, "GET", path, None).await
}

/// A minimal HTTP/1.1 request on loopback (no TLS, `Connection: close`).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&serde_json::Value>,
) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await??;
    let body = json.map(serde_json::Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("an HTTP status line")?;
    Ok((status, body.to_owned()))
}

/// A `kube-sim` process with its control endpoint.
pub struct SimProcess {
    pub url: String,
    pub kubeconfig: PathBuf,
    pub control: SocketAddr,
    _child: Child,
}

impl SimProcess {
    pub async fn start(dir: &Path, name: &str, extra: &[&str]) -> anyhow::Result<SimProcess> {
        let kubeconfig = dir.join(format!("{name}.kubeconfig"));
        let mut child = Command::new(bin("kube-sim"))
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--name", name, "--control", "127.0.0.1:0"])
            .args([
                "--rollout-delay-ms",
                "50",
                "--cr-delay-ms",
                "50",
                "--crd-delay-ms",
                "50",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start kube-sim")?;
        let stdout = child.stdout.take().context("kube-sim stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .context("kube-sim start-up line")??
            .context("kube-sim exited")?;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let control = v["control"]
            .as_str()
            .and_then(|c| c.strip_prefix("http://"))
            .context("control address")?
            .parse()?;
        Ok(SimProcess {
            url: v["url"].as_str().unwrap_or_default().to_owned(),
            kubeconfig,
            control,
            _child: child,
        })
    }

    /// Sets every fault at once (see `kube_sim::FaultSettings`).
    pub async fn faults(&self, settings: serde_json::Value) -> anyhow::Result<()> {
        let (status, body) = http(self.control, "PUT", "/faults", Some(&settings)).await?;
        if status != 200 {
            bail!("setting faults failed: {status} {body}");
        }
        Ok(())
    }

    /// Restores the cluster empty (every object gone).
    pub async fn reset(&self) -> anyhow::Result<()> {
        let (status, _) = http(self.control, "POST", "/reset", None).await?;
        if status != 200 {
            bail!("reset failed: {status}");
        }
        Ok(())
    }

    /// A `kube` client for it (without kube's retries of 503s, so that
    /// injected faults are seen as they are).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        config.default_retry = false;
        Ok(kube::Client::try_from(config)?)
    }

    /// Non-dry-run writes served so far, per object.
    pub async fn writes(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let (status, body) = http_get(self.control, "/writes").await?;
        if status != 200 {
            bail!("reading writes failed: {status}");
        }
        Ok(serde_json::from_str(&body)?)
    }
}

/// An `unitsync-agent` process for one cluster.
pub struct AgentProcess {
    args: Vec<String>,
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts an agent dialing `hub` (a URL) with `token`, applying to the
    /// cluster of `kubeconfig`, keeping its state in `state_dir`.
    pub async fn start(
        hub: &str,
        ca_file: &Path,
        token_file: &Path,
        kubeconfig: &Path,
        state_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let mut args: Vec<String> = vec![
            "--hub".into(),
            hub.into(),
            "--ca-file".into(),
            ca_file.display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let mut agent = AgentProcess { args, child: None };
        agent.restart()?;
        Ok(agent)
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        let child = Command::new(bin("unitsync-agent"))
            .args(&self.args)
            .env("UNITSYNC_LOG", "warn")
            // As the agent image and the install manifests set them.
            .env("MALLOC_ARENA_MAX", "2")
            .env("MALLOC_TRIM_THRESHOLD_", "131072")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start unitsync-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// SIGKILL, as an OOM kill or a node loss would.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&mut c, "-KILL").await;
        }
    }

    /// SIGTERM (how Kubernetes stops a pod); returns the exit status.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Some(pid) = c.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        tokio::time::timeout(Duration::from_secs(20), c.wait())
            .await
            .ok()?
            .ok()
    }
}
