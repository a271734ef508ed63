//! A real OCI registry for tests: Debian's `docker-registry` (distribution
//! 2.8) on a loopback port with its own config (anonymous, htpasswd, or
//! TLS with a generated CA), and pushes with a real OCI client
//! (`oci-client`) in the two layouts unitsync follows: ConfigHub releases
//! and Flux artifacts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use oci_client::client::{
    Certificate, CertificateEncoding, ClientConfig, ClientProtocol, Config, ImageLayer,
};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::process::{Child, Command};

/// The Flux layout (`flux push artifact`).
pub const FLUX_LAYER: &str = "application/vnd.cncf.flux.content.v1.tar+gzip";
pub const FLUX_CONFIG: &str = "application/vnd.cncf.flux.config.v1+json";
/// ConfigHub's release layout: one tar+gzip layer, an empty config.
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// How the registry is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Anonymous,
    /// htpasswd: one user.
    Password {
        user: String,
        password: String,
    },
    /// HTTPS with a generated CA (anonymous).
    Tls,
}

/// A running registry.
pub struct TestRegistry {
    pub port: u16,
    pub access: Access,
    /// The CA certificate (PEM) for [`Access::Tls`].
    pub ca_pem: Option<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn binary() -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join("docker-registry");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "docker-registry is not installed (deploy/test.sh installs it: apt-get install docker-registry)"
    )
}

impl TestRegistry {
    pub async fn start(access: Access) -> anyhow::Result<TestRegistry> {
        let dir = tempfile::tempdir()?;
        let port = crate::processes::free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let mut extra = String::new();
        let mut ca_pem = None;
        match &access {
            Access::Anonymous => {}
            Access::Password { user, password } => {
                let hash = bcrypt::hash(password, 5)?;
                let file = dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{hash}\n"))?;
                extra.push_str(&format!(
                    "auth:\n  htpasswd:\n    realm: unitsync-test\n    path: {}\n",
                    file.display()
                ));
            }
            Access::Tls => {
                let issued = crate::kube_sim::tls::issue("registry")?;
                let (ca, cert, key) = (issued.ca_pem, issued.cert_pem, issued.key_pem);
                let cert_file = dir.path().join("server.crt");
                let key_file = dir.path().join("server.key");
                std::fs::write(&cert_file, cert)?;
                std::fs::write(&key_file, key)?;
                ca_pem = Some(ca);
                extra.push_str(&format!(
                    "  tls:\n    certificate: {}\n    key: {}\n",
                    cert_file.display(),
                    key_file.display()
                ));
            }
        }
        let (http_extra, top_extra) = if access == Access::Tls {
            (extra, String::new())
        } else {
            (String::new(), extra)
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{http_extra}{top_extra}",
            storage.display()
        );
        let config_file = dir.path().join("config.yml");
        std::fs::File::create(&config_file)?.write_all(config.as_bytes())?;
        let child = Command::new(binary()?)
            .arg("serve")
            .arg(&config_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("start docker-registry")?;
        let mut r = TestRegistry {
            port,
            access,
            ca_pem,
            dir,
            child: Some(child),
        };
        r.wait_ready().await?;
        Ok(r)
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            if tokio::time::Instant::now() > deadline {
                bail!("docker-registry did not start on port {}", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// `HOST:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `oci://HOST:PORT/REPO`.
    pub fn url(&self, repo: &str) -> String {
        format!("oci://{}/{repo}", self.host())
    }

    /// Stops the registry (its content stays on disk for a restart).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts it again on the same port with the same content.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        let config_file = self.dir.path().join("config.yml");
        self.child = Some(
            Command::new(binary()?)
                .arg("serve")
                .arg(&config_file)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?,
        );
        self.wait_ready().await
    }

    /// How to push to this registry (cloneable; confighub-sim uses one).
    pub fn pusher(&self) -> Pusher {
        Pusher {
            host: self.host(),
            ca_pem: self.ca_pem.clone(),
            login: match &self.access {
                Access::Password { user, password } => Some((user.clone(), password.clone())),
                _ => None,
            },
        }
    }

    /// Pushes one layer laid out as `layout`; returns the manifest digest.
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        layer: Vec<u8>,
        layout: Layout,
    ) -> anyhow::Result<String> {
        self.pusher().push(repo, tag, layer, layout).await
    }

    /// A Flux-layout artifact (`flux push artifact`) of `files`.
    pub async fn push_flux(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        self.pusher().push_flux(repo, tag, files).await
    }

    /// A ConfigHub-release-layout artifact: `files` hold documents carrying
    /// `confighub.com/origin`.
    pub async fn push_confighub(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &str)],
        target: &str,
    ) -> anyhow::Result<String> {
        self.pusher()
            .push_release(repo, tag, tar_gz(files), target)
            .await
    }
}

/// How an artifact is laid out around its one layer.
pub struct Layout {
    pub layer_type: &'static str,
    /// The config blob and its media type.
    pub config: (Vec<u8>, &'static str),
    pub annotations: BTreeMap<String, String>,
    pub artifact_type: Option<&'static str>,
}

impl Layout {
    /// One layer of `layer_type`, an empty config, no annotations.
    pub fn plain(layer_type: &'static str) -> Layout {
        Layout {
            layer_type,
            config: (b"{}".to_vec(), EMPTY_CONFIG),
            annotations: BTreeMap::new(),
            artifact_type: None,
        }
    }
}

/// Where and how to push (host, its CA for HTTPS, a login).
#[derive(Clone, Debug)]
pub struct Pusher {
    pub host: String,
    /// HTTPS trusting this CA; plain HTTP without it.
    pub ca_pem: Option<String>,
    pub login: Option<(String, String)>,
}

impl Pusher {
    fn client(&self) -> anyhow::Result<Client> {
        crate::cluster::init_crypto();
        let (protocol, certs) = match &self.ca_pem {
            Some(ca) => (
                ClientProtocol::Https,
                vec![Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: ca.clone().into_bytes(),
                }],
            ),
            None => (ClientProtocol::Http, vec![]),
        };
        Ok(Client::try_from(ClientConfig {
            protocol,
            tls_certs_only: certs,
            // Every push in a test is bounded.
            connect_timeout: Some(std::time::Duration::from_secs(10)),
            read_timeout: Some(std::time::Duration::from_secs(30)),
            ..ClientConfig::default()
        })?)
    }

    fn auth(&self) -> RegistryAuth {
        match &self.login {
            Some((user, password)) => RegistryAuth::Basic(user.clone(), password.clone()),
            None => RegistryAuth::Anonymous,
        }
    }

    /// Pushes one layer laid out as `layout`; returns the manifest digest.
    pub async fn push(
        &self,
        repo: &str,
        tag: &str,
        layer: Vec<u8>,
        layout: Layout,
    ) -> anyhow::Result<String> {
        let client = self.client()?;
        let reference = Reference::with_tag(self.host.clone(), repo.to_owned(), tag.to_owned());
        let layers = [ImageLayer::new(layer, layout.layer_type.to_owned(), None)];
        let config = Config::new(layout.config.0, layout.config.1.to_owned(), None);
        let mut manifest = OciImageManifest::build(&layers, &config, Some(layout.annotations));
        manifest.artifact_type = layout.artifact_type.map(str::to_owned);
        client
            .push(&reference, &layers, config, &self.auth(), Some(manifest))
            .await
            .with_context(|| format!("push {repo}:{tag}"))?;
        Ok(client
            .fetch_manifest_digest(&reference, &self.auth())
            .await?)
    }

    /// A Flux-layout artifact (`flux push artifact`) of `files`.
    pub async fn push_flux(
        &self,
        repo: &str,
        tag: &str,
        files: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let annotations = BTreeMap::from([
            (
                "org.opencontainers.image.source".to_owned(),
                "https://example.invalid/repo.git".to_owned(),
            ),
            (
                "org.opencontainers.image.revision".to_owned(),
                format!("main@sha1:{tag}"),
            ),
            (
                "org.opencontainers.image.created".to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            ),
        ]);
        self.push(
            repo,
            tag,
            tar_gz(files),
            Layout {
                layer_type: FLUX_LAYER,
                config: (
                    br#"{"created":"2026-01-01T00:00:00Z"}"#.to_vec(),
                    FLUX_CONFIG,
                ),
                annotations,
                artifact_type: None,
            },
        )
        .await
    }

    /// Pushes a ConfigHub-layout release bundle (a tar+gzip).
    pub async fn push_release(
        &self,
        repo: &str,
        tag: &str,
        bundle: Vec<u8>,
        target: &str,
    ) -> anyhow::Result<String> {
        self.push(
            repo,
            tag,
            bundle,
            Layout {
                layer_type: OCI_LAYER,
                config: (b"{}".to_vec(), EMPTY_CONFIG),
                annotations: BTreeMap::from([(
                    "com.confighub.target.id".to_owned(),
                    target.to_owned(),
                )]),
                artifact_type: Some("application/vnd.confighub.kubernetes.config.v1"),
            },
        )
        .await
    }
}

/// A gzip-compressed tar of `files` (deterministic: fixed times and owners).
pub fn tar_gz(files: &[(&str, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(text.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_767_225_600);
        h.set_cksum();
        b.append_data(&mut h, path, text.as_bytes()).expect("tar");
    }
    gzip(&b.into_inner().expect("tar"))
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}
