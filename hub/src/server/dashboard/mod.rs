//! The operator's dashboard: read-only HTML pages under `/dashboard`, served on the hub's own
//! listener and behind the admin API's own tokens.
//!
//! An operator signs in by pasting an admin token (any role reads) into a form; the hub checks it
//! exactly as it checks a bearer token ([`super::admin::authorize`]) and keeps it in a cookie that
//! scripts cannot read (`HttpOnly`), that no other site's page can make the browser send
//! (`SameSite=Strict`), that only the dashboard receives (`Path=/dashboard`) and, when the hub
//! serves TLS, that never travels in clear (`Secure`). Every page checks the cookie's token again,
//! so a token that stops being known sends its holder back to the sign-in page. Signing in changes
//! nothing, so, like every other read of the admin API, it is not written to the audit log.
//!
//! Pages are rendered on the server from the store, with no script at all, and charts are SVG
//! drawn here ([`svg`]); the stylesheet is compiled into the binary. Every string that reaches a
//! page goes through [`Esc`] (HTML) or [`query_value`] (URLs): device ids, labels, reasons and
//! model names all come from outside and are treated as hostile. A strict Content Security Policy
//! forbids scripts besides, in case an escape is ever missed.

use std::fmt::{self, Write};
use std::time::Duration;

use axum::extract::rejection::{FormRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;

use super::admin::authorize;
use super::SharedHub;
use crate::api::Role;
use crate::store::AdminTokenRecord;

mod alerts;
mod device;
mod drift;
mod fleet;
mod rollouts;
mod svg;

/// Where the dashboard lives; its cookie is scoped to it.
pub const PREFIX: &str = "/dashboard";
/// The cookie holding the signed-in token.
const COOKIE: &str = "outpost_token";
/// Largest form body (the sign-in form holds one token).
const MAX_FORM: usize = 4096;
const STYLE: &str = include_str!("style.css");
/// No scripts, no frames, nothing from elsewhere: the pages need none of it.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

pub fn routes(hub: SharedHub) -> Router {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, Duration::from_secs(30));
    Router::new()
        .route(PREFIX, get(|| async { Redirect::to("/dashboard/fleet") }))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", post(logout))
        .route("/dashboard/style.css", get(style))
        .route("/dashboard/fleet", get(fleet::page))
        .route("/dashboard/devices/{id}", get(device::page))
        .route("/dashboard/rollouts", get(rollouts::page))
        .route("/dashboard/drift", get(drift::page))
        .route("/dashboard/alerts", get(alerts::page))
        .layer(DefaultBodyLimit::max(MAX_FORM))
        .layer(timeout)
        .with_state(hub)
}

/// `text` escaped for HTML text and attribute values (quoted with `"` or `'`).
#[derive(Debug, Clone, Copy)]
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..at])?;
            f.write_str(match rest.as_bytes()[at] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[at + 1..];
        }
        f.write_str(rest)
    }
}

/// `text` percent-encoded for a URL's query value or path segment: everything but RFC 3986's
/// unreserved characters. The result still goes through [`Esc`] inside an attribute.
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A Unix time as UTC, to the second.
pub fn utc(at: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(at))
        .to_string()
        .replace('T', " ")
        .replace('Z', " UTC")
}

/// How long before `now` `at` was, roughly: `42 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
pub fn ago(at: u64, now: u64) -> String {
    let secs = now.saturating_sub(at);
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} d ago", secs / 86_400),
    }
}

/// A `<time>` element: relative text, the exact UTC time on hover.
pub fn time_cell(at: u64, now: u64) -> String {
    format!(
        "<time datetime=\"{}\" title=\"{}\">{}</time>",
        at,
        Esc(&utc(at)),
        Esc(&ago(at, now))
    )
}

/// A coloured badge for a device state, event kind, rollout state or drift status.
pub fn badge(text: &str) -> String {
    let tone = match text {
        "steady" | "committed" | "completed" | "ok" | "shadowing" | "enrolled" | "advance"
        | "complete" => "good",
        "downloading" | "probation" | "activating" | "downloaded" | "active" | "resume" => "busy",
        "degraded" | "warn" | "stalled" | "paused" | "pause" | "silent" | "labels" => "warn",
        "failed" | "rolled_back" | "refused" | "revoked" | "alert" | "rollback" | "rolled-back"
        | "breached" => "bad",
        _ => "plain",
    };
    format!("<span class=\"badge {tone}\">{}</span>", Esc(text))
}

/// The pages' navigation entries: (path, title).
const NAV: [(&str, &str); 4] = [
    ("/dashboard/fleet", "Fleet"),
    ("/dashboard/rollouts", "Rollouts"),
    ("/dashboard/drift", "Drift"),
    ("/dashboard/alerts", "Alerts"),
];

/// A whole page: the shell around `body`, with `current` highlighted in the navigation.
pub fn page(title: &str, current: &str, viewer: &AdminTokenRecord, body: &str) -> Response {
    let mut html = head(title);
    html.push_str(
        "<header class=\"top\"><a class=\"brand\" href=\"/dashboard/fleet\">Outpost</a><nav>",
    );
    for (path, name) in NAV {
        let class = if name == current {
            " class=\"current\""
        } else {
            ""
        };
        let _ = write!(html, "<a href=\"{path}\"{class}>{name}</a>");
    }
    let _ = write!(
        html,
        "</nav><span class=\"who\">{} · {}</span>\
         <form method=\"post\" action=\"/dashboard/logout\"><button id=\"logout\" type=\"submit\">\
         Log out</button></form></header><main>{body}</main></body></html>",
        Esc(&viewer.name),
        super::admin::role_of(viewer.role).as_str()
    );
    html_response(StatusCode::OK, html)
}

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Outpost</title><link rel=\"stylesheet\" href=\"/dashboard/style.css\">\
         </head><body>",
        Esc(title)
    )
}

/// An HTML answer with the headers every page carries: no caching (the pages hold fleet data and
/// sit behind a cookie), no sniffing, no scripts, no framing, no referrer to other sites.
pub fn html_response(status: StatusCode, html: String) -> Response {
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    // Addresses (device ids, filters) go to no other site; `no-referrer` would also make the
    // browser send `Origin: null` with the sign-in form, which `cross_site` refuses.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    response
}

/// A page that says what went wrong with the request (a bad filter, an unknown device).
pub fn problem(
    status: StatusCode,
    viewer: &AdminTokenRecord,
    current: &str,
    message: &str,
) -> Response {
    let body = format!(
        "<h1>{}</h1><p class=\"error\" id=\"problem\">{}</p>",
        status.as_u16(),
        Esc(message)
    );
    let mut response = page(current, current, viewer, &body);
    *response.status_mut() = status;
    response
}

/// A failure of the hub itself: logged, and a page that points at the log.
pub fn internal(viewer: &AdminTokenRecord, current: &str, error: impl fmt::Display) -> Response {
    log::error!("dashboard page {current} failed: {error:#}");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        viewer,
        current,
        "internal error; see the hub's log",
    )
}

/// The token in the dashboard's cookie, if the request carries one.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// The signed-in viewer, or the answer that sends the browser to sign in: with no cookie, to the
/// sign-in page; with a cookie whose token the hub no longer knows, there with that said and the
/// cookie cleared. (Boxed: an answer is large beside the record.)
pub async fn viewer(
    hub: &SharedHub,
    headers: &HeaderMap,
) -> Result<AdminTokenRecord, Box<Response>> {
    let Some(token) = cookie_token(headers) else {
        return Err(Box::new(
            Redirect::to("/dashboard/login?why=signin").into_response(),
        ));
    };
    match authorize(hub, token, Role::Viewer).await {
        Ok(record) => Ok(record),
        Err(error) if error.status() == StatusCode::UNAUTHORIZED => {
            let mut response = Redirect::to("/dashboard/login?why=expired").into_response();
            response
                .headers_mut()
                .insert(header::SET_COOKIE, clear_cookie(hub));
            Err(Box::new(response))
        }
        Err(error) => {
            log::error!("dashboard: checking a token failed: {error}");
            Err(Box::new(login_form(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("The hub could not check the token; see its log."),
            )))
        }
    }
}

/// The signed-in viewer and a page's parsed query, or the answer to send instead: the sign-in
/// redirect, or a page naming what is wrong with the query.
pub async fn viewer_and_query<T>(
    hub: &SharedHub,
    headers: &HeaderMap,
    query: Result<Query<T>, QueryRejection>,
    title: &str,
) -> Result<(AdminTokenRecord, T), Box<Response>> {
    let viewer = viewer(hub, headers).await?;
    match query {
        Ok(Query(query)) => Ok((viewer, query)),
        Err(rejection) => Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            &viewer,
            title,
            &format!("bad query: {}", rejection.body_text()),
        ))),
    }
}

fn cookie_flags(hub: &SharedHub) -> &'static str {
    if hub.config.tls.is_some() {
        "; HttpOnly; SameSite=Strict; Path=/dashboard; Secure"
    } else {
        "; HttpOnly; SameSite=Strict; Path=/dashboard"
    }
}

fn clear_cookie(hub: &SharedHub) -> HeaderValue {
    let value = format!("{COOKIE}={}; Max-Age=0", cookie_flags(hub));
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("outpost_token="))
}

#[derive(Debug, Deserialize)]
struct LoginQuery {
    why: Option<String>,
}

/// The sign-in page; `why` picks one of a few fixed messages (never text from the URL).
async fn login_page(Query(query): Query<LoginQuery>) -> Response {
    let message = match query.why.as_deref() {
        Some("expired") => {
            Some("Your token is not known to this hub (revoked or unknown): sign in again.")
        }
        Some("loggedout") => Some("You have logged out."),
        Some("signin") => Some("Sign in with an admin token to view the dashboard."),
        _ => None,
    };
    login_form(StatusCode::OK, message)
}

fn login_form(status: StatusCode, message: Option<&str>) -> Response {
    let mut html = head("Sign in");
    html.push_str("<main class=\"login\"><h1>Outpost hub</h1>");
    if let Some(message) = message {
        let class = if status.is_success() { "note" } else { "error" };
        let _ = write!(
            html,
            "<p class=\"{class}\" id=\"message\">{}</p>",
            Esc(message)
        );
    }
    html.push_str(
        "<form method=\"post\" action=\"/dashboard/login\">\
         <label for=\"token\">Admin token (any role)</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required>\
         <button id=\"signin\" type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">Make one with <code>outpost-hub admin-token create --name NAME --role viewer</code>.\
         </p></main></body></html>",
    );
    html_response(status, html)
}

/// True when a form was posted from another site: its `Origin` names another host than the one
/// the request is for. SameSite keeps the cookie from such requests; this keeps another site from
/// signing a browser in with a token of its choosing, or out. Clients that send no `Origin` (curl)
/// are not browsers carrying someone's session, and pass.
fn cross_site(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|origin| origin.split_once("://"))
        .map(|(_, authority)| authority);
    !matches!((origin_host, host), (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host))
}

fn cross_site_refusal() -> Response {
    login_form(
        StatusCode::FORBIDDEN,
        Some("That form was sent from another site; sign in from this page."),
    )
}

#[derive(Debug, Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if cross_site(&headers) {
        return cross_site_refusal();
    }
    let Ok(Form(form)) = form else {
        return login_form(
            StatusCode::BAD_REQUEST,
            Some("The sign-in form was not sent whole; paste a token and sign in."),
        );
    };
    let token = form.token.trim();
    // Only a token the hub knows is ever put in a cookie, so the cookie's value is always `opa_`
    // and hex digits, never text to smuggle a cookie attribute in.
    match authorize(&hub, token, Role::Viewer).await {
        Ok(record) => {
            log::info!("dashboard: {} signed in", record.name);
            let cookie = format!("{COOKIE}={token}{}", cookie_flags(&hub));
            let mut response = Redirect::to("/dashboard/fleet").into_response();
            match HeaderValue::from_str(&cookie) {
                Ok(value) => {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                    response
                }
                Err(_) => login_form(
                    StatusCode::UNAUTHORIZED,
                    Some("That token is not known to this hub."),
                ),
            }
        }
        Err(error) if error.status() == StatusCode::UNAUTHORIZED => login_form(
            StatusCode::UNAUTHORIZED,
            Some("That token is not known to this hub."),
        ),
        Err(error) => {
            log::error!("dashboard: checking a token failed: {error}");
            login_form(
                StatusCode::INTERNAL_SERVER_ERROR,
                Some("The hub could not check the token; see its log."),
            )
        }
    }
}

async fn logout(State(hub): State<SharedHub>, headers: HeaderMap) -> Response {
    if cross_site(&headers) {
        return cross_site_refusal();
    }
    let mut response = Redirect::to("/dashboard/login?why=loggedout").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie(&hub));
    response
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            Esc("<script>alert('x') & \"y\"</script>").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
        assert_eq!(Esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn percent_encodes_query_values() {
        assert_eq!(query_value("env=prod&x"), "env%3Dprod%26x");
        assert_eq!(query_value("a b\"<"), "a%20b%22%3C");
        assert_eq!(query_value("demo@3"), "demo%403");
    }

    #[test]
    fn refuses_forms_posted_from_another_site() {
        let mut headers = HeaderMap::new();
        assert!(
            !cross_site(&headers),
            "no Origin: not a browser's cross-site post"
        );
        headers.insert(header::HOST, HeaderValue::from_static("localhost:8443"));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://localhost:8443"),
        );
        assert!(!cross_site(&headers));
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(cross_site(&headers));
        headers.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(cross_site(&headers));
    }

    #[test]
    fn reads_the_cookie_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; outpost_token=opa_ab; b=2"),
        );
        assert_eq!(cookie_token(&headers), Some("opa_ab"));
        headers.insert(header::COOKIE, HeaderValue::from_static("outpost_token="));
        assert_eq!(cookie_token(&headers), None);
    }
}
