//! The page shell (header, navigation, who is logged in, the live
//! region) and the small pieces every page uses: phase badges (colour and
//! a symbol and the word, never colour alone), times, sources, links.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, html};

use super::Viewer;
use crate::model::{Phase, Unit, UnitRef, UnixMillis};

/// The sections in the navigation bar.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    Fleet,
    Promotions,
    Clusters,
    Audit,
}

impl Nav {
    /// The least time between two live refreshes of a page of this
    /// section: the fleet follows closely; a promotion plan (a dry run
    /// per environment pair) and the others less often.
    fn refresh_ms(self) -> u64 {
        match self {
            Nav::Fleet => 250,
            Nav::Clusters | Nav::Audit => 1_000,
            Nav::Promotions => 2_000,
        }
    }
}

const SECTIONS: [(Nav, &str, &str); 4] = [
    (Nav::Fleet, "/ui/", "Fleet"),
    (Nav::Promotions, "/ui/promotions", "Promotions"),
    (Nav::Clusters, "/ui/clusters", "Clusters"),
    (Nav::Audit, "/ui/audit", "Audit"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · unitsync" }
            link rel="stylesheet" href=(super::assets::CSS_PATH.as_str());
            script src=(super::assets::JS_PATH.as_str()) defer {}
        }
    }
}

/// A whole page; for a live update, only its live region. `top` stays
/// as rendered (filters, forms being typed in); `live` is re-rendered when
/// the fleet changes.
pub(super) fn page(viewer: &Viewer, title: &str, nav: Nav, top: Markup, live: Markup) -> Response {
    if viewer.partial {
        return live.into_response();
    }
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.bar {
                    a.brand href="/ui/" { "unitsync" }
                    nav {
                        @for (n, href, label) in SECTIONS {
                            a href=(href) aria-current=[(n == nav).then_some("page")] { (label) }
                        }
                    }
                    span #live-state .muted title="Live updates need JavaScript" { "static" }
                    span.who {
                        (viewer.session.operator)
                        " "
                        span.role { (viewer.session.role.as_str()) }
                    }
                    form.inline method="post" action="/ui/logout" {
                        (csrf(viewer))
                        button.link type="submit" { "Log out" }
                    }
                }
                main {
                    @if let Some(f) = &viewer.flash { p.flash role="status" { (f) } }
                    (top)
                    div #live data-refresh-ms=(nav.refresh_ms()) { (live) }
                }
            }
        }
    }
    .into_response()
}

/// A page without the navigation (login).
pub(super) fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare { main { (body) } }
        }
    }
}

pub(super) fn error_page(status: StatusCode, message: &str) -> Markup {
    bare(
        status.canonical_reason().unwrap_or("Error"),
        html! {
            div.error-page {
                h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                p.error role="alert" { (message) }
                p { a href="/ui/" { "Back to the fleet" } }
            }
        },
    )
}

/// The hidden CSRF field every form carries.
pub(super) fn csrf(viewer: &Viewer) -> Markup {
    html! { input type="hidden" name="csrf" value=(viewer.session.csrf); }
}

/// A symbol per phase, so a phase reads without colour.
fn symbol(p: Phase) -> &'static str {
    match p {
        Phase::Ready => "✓",
        Phase::Applying | Phase::Applied | Phase::Progressing => "↻",
        Phase::Degraded | Phase::Failed => "✗",
        Phase::Drifted => "≠",
        Phase::Destroyed => "∅",
        Phase::Superseded => "»",
        Phase::Unknown => "?",
    }
}

/// The CSS class of a phase (its colour).
pub(super) fn phase_class(p: Phase) -> &'static str {
    match p {
        Phase::Ready => "ok",
        Phase::Applying | Phase::Applied | Phase::Progressing => "busy",
        Phase::Degraded | Phase::Failed => "bad",
        Phase::Drifted => "warn",
        Phase::Destroyed | Phase::Superseded | Phase::Unknown => "idle",
    }
}

pub(super) fn phase(p: Phase) -> Markup {
    html! {
        span class={ "badge " (phase_class(p)) } {
            span.sym aria-hidden="true" { (symbol(p)) } " " (p.as_str())
        }
    }
}

/// A health or sync word from an agent report, coloured like the phases.
pub(super) fn word(s: &str) -> Markup {
    let class = match s {
        "Ready" | "Synced" | "Current" => "ok",
        "InProgress" | "Terminating" | "Pending" => "busy",
        "Failed" | "Stuck" | "Error" => "bad",
        "Drifted" | "OutOfSync" => "warn",
        _ => "idle",
    };
    html! { span class={ "badge small " (class) } { (s) } }
}

/// How long ago, in words an operator reads at a glance.
pub(super) fn ago(t: UnixMillis) -> String {
    if t.0 <= 0 {
        return "never".into();
    }
    let now = UnixMillis::now().0;
    let (d, suffix) = if t.0 > now {
        (t.0 - now, "from now")
    } else {
        (now - t.0, "ago")
    };
    let s = d / 1000;
    let text = match s {
        0..=4 => {
            return if suffix == "ago" {
                "just now".into()
            } else {
                "in a moment".into()
            };
        }
        5..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    };
    if suffix == "ago" {
        format!("{text} ago")
    } else {
        format!("in {text}")
    }
}

/// RFC 3339 (UTC, seconds).
pub(super) fn rfc3339(t: UnixMillis) -> String {
    humantime::format_rfc3339_seconds(t.to_system_time()).to_string()
}

/// A time: relative, with the exact time on hover.
pub(super) fn time(t: UnixMillis) -> Markup {
    if t.0 <= 0 {
        return html! { span.muted { "never" } };
    }
    html! { time datetime=(rfc3339(t)) title=(rfc3339(t)) { (ago(t)) } }
}

pub(super) fn unit_href(u: &UnitRef) -> String {
    format!(
        "/ui/units/{}/{}",
        super::encode_query(u.env.as_str()),
        super::encode_query(u.name.as_str())
    )
}

/// Where a unit's content comes from.
pub(super) fn source(u: &Unit) -> Markup {
    let (class, label, title) = if let Some(space) = u.source.strip_prefix("confighub:") {
        (
            "src-confighub",
            "ConfigHub".to_owned(),
            format!("ConfigHub space {space}"),
        )
    } else if let Some(name) = u.source.strip_prefix("oci:") {
        (
            "src-oci",
            format!("OCI {name}"),
            format!("OCI release source {name}"),
        )
    } else if let Some(up) = &u.upstream {
        (
            "src-promotion",
            "promoted".to_owned(),
            format!("promoted from {up}"),
        )
    } else if u.source.is_empty() {
        (
            "src-cli",
            "CLI".to_owned(),
            "published with the unitsync CLI or API".to_owned(),
        )
    } else {
        ("src-other", u.source.clone(), u.source.clone())
    };
    html! { span class={ "src " (class) } title=(title) { (label) } }
}

/// "1 cluster", "2 clusters".
pub(super) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A revision number.
pub(super) fn rev(n: u64) -> String {
    format!("r{n}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_reads_without_colour() {
        for p in Phase::ALL {
            let m = phase(p).into_string();
            assert!(m.contains(p.as_str()) && m.contains(symbol(p)), "{m}");
        }
    }

    #[test]
    fn times_read_as_words() {
        let now = UnixMillis::now().0;
        assert_eq!(ago(UnixMillis(0)), "never");
        assert_eq!(ago(UnixMillis(now - 1_000)), "just now");
        assert_eq!(ago(UnixMillis(now - 90_000)), "1m ago");
        assert_eq!(ago(UnixMillis(now - 3 * 86_400_000)), "3d ago");
        assert_eq!(ago(UnixMillis(now + 2 * 86_400_000 + 5_000)), "in 2d");
    }
}
