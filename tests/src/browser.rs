//! A real browser for dashboard tests: headless Chromium driven through
//! `chromedriver` (WebDriver) by fantoccini. Each [`Browser`] runs its own
//! chromedriver on a free port and ends it when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use tokio::process::{Child, Command};

/// A headless Chromium session.
pub struct Browser {
    pub client: Client,
    _driver: Child,
}

fn binary(names: &[&str]) -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        for name in names {
            let p = PathBuf::from(dir).join(name);
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "{} is not installed (deploy/test.sh installs it: apt-get install chromium chromium-driver)",
        names[0]
    )
}

impl Browser {
    pub async fn start() -> anyhow::Result<Browser> {
        let driver = binary(&["chromedriver"])?;
        let chromium = binary(&["chromium", "chromium-browser", "google-chrome"])?;
        let port = crate::processes::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting chromedriver")?;
        let url = format!("http://127.0.0.1:{port}");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--no-first-run", "--disable-extensions"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        // chromedriver takes a moment to listen; Chromium to start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let client = loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(30),
                ClientBuilder::new(connector.clone())
                    .capabilities(caps.clone())
                    .connect(&url),
            )
            .await;
            match attempt {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) if tokio::time::Instant::now() > deadline => {
                    bail!("cannot start a headless Chromium session: {e}")
                }
                Err(_) => bail!("chromedriver did not answer within 30 s"),
                Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        Ok(Browser {
            client,
            _driver: child,
        })
    }

    pub async fn goto(&self, url: &str) {
        within("navigate", self.client.goto(url)).await.unwrap();
    }

    /// Finds the first element `css` selects and runs `f` on it, again if
    /// a live update replaced the element in between.
    async fn on<T, F, Fut>(&self, css: &str, f: F) -> T
    where
        F: Fn(fantoccini::elements::Element) -> Fut,
        Fut: std::future::Future<Output = Result<T, fantoccini::error::CmdError>>,
    {
        within(css, async {
            loop {
                let el = self
                    .client
                    .wait()
                    .for_element(Locator::Css(css))
                    .await
                    .unwrap_or_else(|e| panic!("no {css}: {e}"));
                match f(el).await {
                    Ok(v) => return v,
                    Err(e) if e.is_stale_element_reference() => continue,
                    Err(e) => panic!("{css}: {e}"),
                }
            }
        })
        .await
    }

    /// The text of the first element `css` selects.
    pub async fn text(&self, css: &str) -> String {
        self.on(css, |el| async move { el.text().await }).await
    }

    pub async fn count(&self, css: &str) -> usize {
        within(css, self.client.find_all(Locator::Css(css)))
            .await
            .unwrap()
            .len()
    }

    pub async fn click(&self, css: &str) {
        self.on(css, |el| async move { el.click().await.map(drop) })
            .await
    }

    pub async fn fill(&self, css: &str, text: &str) {
        self.on(css, |el| async move { el.send_keys(text).await })
            .await
    }

    /// Runs `script` in the page and returns its value.
    pub async fn js(&self, script: &str) -> serde_json::Value {
        within("script", self.client.execute(script, vec![]))
            .await
            .unwrap()
    }

    /// Saves a screenshot as `target/ui-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) -> PathBuf {
        let png = within("screenshot", self.client.screenshot())
            .await
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.close()).await;
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    crate::within(what, f).await
}
