//! What browsers are told and refused: requests that change something from another site
//! (cross-site request forgery), and the headers that keep vigil's pages out of other
//! sites' frames and its files from being sniffed as another type.
//!
//! Without API keys, any web page an operator opens could otherwise post to a vigil on
//! the operator's network (a browser sends a form or an untyped body cross-site without
//! asking): start training jobs, reload models, fill the disk with inspections. Camera
//! PCs and scripts send neither `Origin` nor `Sec-Fetch-Site`, so they are not affected.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The operator's page: its own scripts and styles (the page sets style attributes), the
/// images it makes from fetched bytes, and nothing from elsewhere.
pub const PAGE_CSP: &str = "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Refuses, with `403 cross_origin_request`, a request that changes something and that a
/// browser says comes from another site: by `Sec-Fetch-Site` where the browser sends it,
/// else by an `Origin` other than the `Host` it was sent to. Reads (GET, HEAD, OPTIONS)
/// pass: no CORS headers are sent, so another site cannot read their answers.
pub async fn refuse_cross_site(req: Request, next: Next) -> Response {
    if !is_safe(req.method()) && is_cross_site(req.headers()) {
        return ApiError::CrossOrigin.into_response();
    }
    next.run(req).await
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

fn is_cross_site(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        // `none`: typed into the address bar or a bookmark, not sent by a page.
        return !matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    // `Origin: null` (a sandboxed frame, a file) is another site too.
    let Some((scheme, authority)) = origin.to_str().ok().and_then(|o| o.split_once("://")) else {
        return true;
    };
    // Browsers send Sec-Fetch-Site only over HTTPS and to localhost, so on a plain-HTTP
    // factory network this is the check. The port a scheme implies may be written or not
    // (`Host: vigil:80` from some proxies), and a proxy that rewrites Host says where the
    // request was sent in X-Forwarded-Host (a page cannot set that header cross-site
    // without a preflight, which vigil does not answer).
    let default_port = match scheme {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    let plain = |a: &str| {
        let a = a.trim();
        a.strip_suffix(default_port)
            .filter(|_| !default_port.is_empty())
            .unwrap_or(a)
            .to_ascii_lowercase()
    };
    let origin = plain(authority);
    // X-Forwarded-Host may list the hosts of a chain of proxies: the first is the client's.
    let sent_to = [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name)?.to_str().ok()?.split(',').next());
    !sent_to.into_iter().any(|h| plain(h) == origin)
}

/// Headers on every answer: no content-type sniffing (a stored image served as what it
/// is), no framing by other sites (the page has buttons), no referrer sent onwards.
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cross_site_is_told_by_fetch_metadata_else_by_origin_against_host() {
        let cases: &[(&[(&str, &str)], bool)] = &[
            // A camera PC or a script: neither header.
            (&[("host", "vigil:8080")], false),
            (
                &[("sec-fetch-site", "same-origin"), ("origin", "http://evil.example")],
                false,
            ),
            (&[("sec-fetch-site", "none")], false),
            (
                &[
                    ("sec-fetch-site", "cross-site"),
                    ("origin", "http://vigil:8080"),
                    ("host", "vigil:8080"),
                ],
                true,
            ),
            (&[("sec-fetch-site", "same-site")], true),
            (&[("origin", "http://vigil:8080"), ("host", "vigil:8080")], false),
            (&[("origin", "http://VIGIL:8080"), ("host", "vigil:8080")], false),
            (&[("origin", "http://evil.example"), ("host", "vigil:8080")], true),
            (&[("origin", "http://vigil:9090"), ("host", "vigil:8080")], true),
            (&[("origin", "null"), ("host", "vigil:8080")], true),
            (&[("origin", "http://vigil:8080")], true),
            // The port the scheme implies, written on one side only.
            (&[("origin", "http://vigil"), ("host", "vigil:80")], false),
            (&[("origin", "https://vigil:443"), ("host", "vigil")], false),
            (&[("origin", "http://vigil"), ("host", "vigil:8080")], true),
            (&[("origin", "http://[::1]:8080"), ("host", "[::1]:8080")], false),
            (&[("origin", "http://[::1]:8080"), ("host", "[::1]:9090")], true),
            // A proxy that rewrote Host to its upstream's name.
            (
                &[
                    ("origin", "http://vigil.plant"),
                    ("host", "backend:8080"),
                    ("x-forwarded-host", "vigil.plant"),
                ],
                false,
            ),
            (
                &[
                    ("origin", "http://evil.example"),
                    ("host", "backend:8080"),
                    ("x-forwarded-host", "vigil.plant"),
                ],
                true,
            ),
        ];
        for (pairs, cross) in cases {
            assert_eq!(is_cross_site(&headers(pairs)), *cross, "{pairs:?}");
        }
    }
}
