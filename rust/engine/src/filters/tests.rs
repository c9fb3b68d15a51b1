use super::*;

use crate::response::Response;
use crate::session::test_session as session;

/// The request-phase run, for filter lists where nothing waits.
fn run(filters: &Filters, session: &mut Session) -> Option<Response> {
    match filters.on_request(session) {
        Step::Continue => None,
        Step::Answer(answer) => Some(answer),
        Step::Wait(at) => unreachable!("filter {at} waits: these tests have none that do"),
    }
}

fn path_regex(pattern: &str) -> Condition {
    Condition::Path(TextMatch::Regex(regex::Regex::new(pattern).unwrap()))
}

fn redirect(when: Condition, to: &str) -> Filter {
    let groups = Filter::groups(Some(&when), None);
    let to = Template::parse("to", to, groups).unwrap();
    let status = StatusCode::PERMANENT_REDIRECT;
    Filter::new(Some(when), Action::Redirect { to, status })
}

#[test]
fn the_first_filter_that_answers_ends_the_list() {
    let filters = Filters::new(vec![
        Filter::new(
            Some(Condition::Path(TextMatch::Exact("/healthz".into()))),
            Action::Respond {
                status: StatusCode::OK,
                body: "ok".into(),
                headers: http::HeaderMap::new(),
            },
        ),
        Filter::new(None, Action::Deny(StatusCode::FORBIDDEN)),
        Filter::new(
            None,
            Action::Respond {
                status: StatusCode::OK,
                body: "never".into(),
                headers: http::HeaderMap::new(),
            },
        ),
    ])
    .unwrap();
    let answer = run(&filters, &mut session("GET", "/healthz", &[])).unwrap();
    assert_eq!(
        (answer.status, &answer.body[..]),
        (StatusCode::OK, &b"ok"[..])
    );
    let answer = run(&filters, &mut session("GET", "/x", &[])).unwrap();
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(&answer.body[..], b"403 Forbidden\n");
}

#[test]
fn redirects_render_request_values_and_captures() {
    let filters = Filters::new(vec![redirect(
        path_regex(r"^/old/(?P<rest>.*)$"),
        "https://{host}/new/{rest}?{query}",
    )])
    .unwrap();
    let mut s = session("GET", "/old/a/b?x=1", &[("host", "Example.com:8080")]);
    let answer = run(&filters, &mut s).unwrap();
    assert_eq!(answer.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(
        answer.headers["location"],
        "https://Example.com/new/a/b?x=1"
    );
    assert!(run(&filters, &mut session("GET", "/other", &[])).is_none());
}

#[test]
fn request_headers_path_rewrites_and_request_ids() {
    let pattern = regex::Regex::new(r"^/api/v1/(.*)$").unwrap();
    let to = Template::parse("to", "/v2/{1}", Filter::groups(None, None)).unwrap_err();
    assert_eq!(to.message, "unknown placeholder {1}");
    let rewrite = Action::RewritePath {
        to: Template::parse("to", "/v2/{1}", Groups::of(Some(&pattern))).unwrap(),
        pattern,
    };
    let name = http::HeaderName::from_static("x-id-copy");
    let copy = Template::parse("value", "{request_id}", Groups::default()).unwrap();
    let filters = Filters::new(vec![
        Filter::new(None, Action::RequestId),
        Filter::new(None, Action::SetRequestHeader(name, copy)),
        Filter::new(
            None,
            Action::RemoveRequestHeader(http::HeaderName::from_static("x-drop")),
        ),
        Filter::new(None, rewrite),
    ])
    .unwrap();
    let mut s = session("GET", "/api/v1/users?page=2", &[("x-drop", "1")]);
    assert!(run(&filters, &mut s).is_none());
    let id = s.req.headers["x-request-id"].clone();
    assert_eq!(id.len(), 32);
    assert!(id
        .as_bytes()
        .iter()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)));
    // Not a bare counter: the two halves are keyed hashes of it.
    assert!(id.as_bytes().iter().filter(|&&b| b == b'0').count() < 16);
    assert_eq!(s.req.headers["x-id-copy"], id);
    assert_eq!(s.request_id.as_ref(), Some(&id));
    assert!(!s.req.headers.contains_key("x-drop"));
    assert_eq!(s.req.uri, "/v2/users?page=2");
    // The client's id is kept; each request without one gets its own.
    let mut kept = session("GET", "/", &[("x-request-id", "abc")]);
    run(&filters, &mut kept);
    assert_eq!(kept.req.headers["x-request-id"], "abc");
    let mut other = session("GET", "/", &[]);
    run(&filters, &mut other);
    assert_ne!(other.req.headers["x-request-id"], id);
}

#[test]
fn response_filters_edit_the_response_head() {
    let value = Template::parse("value", "max-age=60", Groups::default()).unwrap();
    let filters = Filters::new(vec![
        Filter::new(None, Action::RemoveResponseHeader(http::header::SERVER)),
        Filter::new(
            Some(Condition::Method(vec![http::Method::GET])),
            Action::SetResponseHeader(http::header::CACHE_CONTROL, value),
        ),
    ])
    .unwrap();
    let mut head = http::Response::builder()
        .header("server", "nginx")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let mut s = session("GET", "/", &[]);
    assert!(run(&filters, &mut s).is_none());
    filters.on_response(&mut s, &mut head);
    assert!(!head.headers.contains_key("server"));
    assert_eq!(head.headers["cache-control"], "max-age=60");
}

#[test]
fn bad_statuses_name_the_filter_and_field() {
    let to = Template::parse("to", "/", Groups::default()).unwrap();
    let error = Filters::new(vec![
        Filter::new(None, Action::RequestId),
        Filter::new(
            None,
            Action::Redirect {
                to,
                status: StatusCode::OK,
            },
        ),
    ])
    .unwrap_err();
    assert_eq!(error.field, "filters[1].status");
}
