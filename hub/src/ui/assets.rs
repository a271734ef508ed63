//! The dashboard's stylesheet and script, embedded in the binary (no CDN,
//! nothing fetched at run time). Their paths carry a hash of their
//! content, so browsers may cache them for good.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};

const CSS: &str = include_str!("assets/app.css");
const JS: &str = include_str!("assets/app.js");

fn versioned(stem: &str, ext: &str, content: &str) -> String {
    let hash = hex::encode(&Sha256::digest(content.as_bytes())[..6]);
    format!("/ui/assets/{stem}.{hash}.{ext}")
}

/// Where the stylesheet is served.
pub(super) static CSS_PATH: LazyLock<String> = LazyLock::new(|| versioned("app", "css", CSS));
/// Where the script is served.
pub(super) static JS_PATH: LazyLock<String> = LazyLock::new(|| versioned("app", "js", JS));

pub(super) async fn serve(Path(file): Path<String>) -> Response {
    let path = format!("/ui/assets/{file}");
    let (body, kind) = if path == *CSS_PATH {
        (CSS, "text/css; charset=utf-8")
    } else if path == *JS_PATH {
        (JS, "text/javascript; charset=utf-8")
    } else {
        return (StatusCode::NOT_FOUND, "no such asset\n").into_response();
    };
    let mut res = body.into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    res
}
