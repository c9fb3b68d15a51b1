//! Request paths in one canonical spelling, so that a path condition cannot be stepped around
//! by spelling the same path another way (`/%61dmin/`, `//admin/`, `/./admin/`,
//! `/x/../admin/`) that the server behind the proxy reads as the one the condition names.
//!
//! The model is Envoy's `normalize_path` with `merge_slashes` (Istio's `MERGE_SLASHES`):
//! RFC 3986 normalization (section 6.2.2: percent-encoded unreserved characters decoded, the
//! hex of the other escapes in upper case; section 5.2.4: dot segments removed, `%2E` ones
//! included), then runs of slashes merged into one. Escapes of reserved characters stay
//! escaped: `%2F` is data inside a segment, not a separator (Envoy's default, `KEEP_UNCHANGED`),
//! and decoding it would change which segments the upstream sees. The query is not touched.
//!
//! Two spellings have no canonical form and are refused (400), as nginx refuses them: a path
//! whose `..` climbs above the root (`/../x`), and a `%` not followed by two hex digits.

use std::borrow::Cow;

use crate::error::{Error, ErrorKind};
use crate::filters::replace_path;

/// Why a path has no canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// A `..` segment with nothing left above it to remove.
    AboveRoot,
    /// A `%` not followed by two hex digits.
    BadEscape,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PathError::AboveRoot => "the request path climbs above the root with '..'",
            PathError::BadEscape => "the request path has a '%' not followed by two hex digits",
        })
    }
}

/// `path` (an origin-form path, starting with `/`) in its canonical form; borrowed, with no
/// allocation, when it is already canonical (a single scan tells).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)?))
}

/// Give `req` its canonical path (the query kept), before the filters and routes read it.
/// Targets that are not a path (`OPTIONS *`) are left as they are. Errors are 400s.
pub(crate) fn normalize_request(req: &mut http::request::Parts) -> Result<(), Error> {
    let path = req.uri.path();
    if !path.starts_with('/') {
        return Ok(());
    }
    let normal = match normalize(path) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(normal)) => normal,
        Err(error) => return Err(Error::new(ErrorKind::InvalidRequest, error.to_string())),
    };
    if replace_path(req, &normal) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidRequest,
            "the request path is not a valid path once normalized",
        ))
    }
}

/// Whether `path` is already canonical: every escape is of a reserved character, in upper
/// case, and no segment is empty (but a trailing one), `.` or `..`.
fn is_normal(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        match path[i] {
            b'/' => {
                let next = &path[i + 1..];
                if next.first() == Some(&b'/') || starts_with_dot_segment(next) {
                    return false;
                }
            }
            b'%' => match escaped(path, i) {
                Some(byte) if !is_unreserved(byte) && is_upper_hex(&path[i + 1..i + 3]) => i += 2,
                _ => return false,
            },
            _ => {}
        }
        i += 1;
    }
    true
}

/// Whether `segment_start` (what follows a `/`) begins with a `.` or `..` segment.
fn starts_with_dot_segment(segment_start: &[u8]) -> bool {
    let segment = segment_start
        .split(|&b| b == b'/')
        .next()
        .unwrap_or_default();
    segment == b"." || segment == b".."
}

/// The byte escaped by the `%` at `at`, if two hex digits follow it.
fn escaped(path: &[u8], at: usize) -> Option<u8> {
    let hex = path.get(at + 1..at + 3)?;
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(hex[0])? * 16 + digit(hex[1])?) as u8)
}

fn is_upper_hex(digits: &[u8]) -> bool {
    digits.iter().all(|b| !b.is_ascii_lowercase())
}

/// RFC 3986's unreserved characters: the ones whose escape means the same as the character.
fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// `path` with its unreserved escapes decoded and the others' hex in upper case.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let byte = escaped(rest.as_bytes(), at).ok_or(PathError::BadEscape)?;
        if is_unreserved(byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// RFC 3986 section 5.2.4 on a path starting with `/`, with empty segments merged away
/// first (a `..` after `//` removes the segment before the slashes, as in nginx): a trailing
/// `/`, `/.` or `/..` leaves a trailing slash, as the RFC's algorithm does.
fn remove_dot_segments(path: &str) -> Result<String, PathError> {
    let mut out = String::with_capacity(path.len());
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "" | "." => {}
            ".." => {
                let parent = out.rfind('/').ok_or(PathError::AboveRoot)?;
                out.truncate(parent);
            }
            _ => {
                out.push('/');
                out.push_str(segment);
                continue;
            }
        }
        if segments.peek().is_none() {
            out.push('/');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_take_their_canonical_form() {
        let table = [
            // Unreserved escapes decoded, whatever the case of their hex.
            ("/%61dmin/panel", "/admin/panel"),
            ("/%41%7a%30-%2D%2e%5F%7E", "/Az0--._~"),
            // The others kept, their hex in upper case.
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/%3f%20x", "/a%2Fb/%3F%20x"),
            ("/%c3%a9", "/%C3%A9"),
            // Slashes merged.
            ("//admin/panel", "/admin/panel"),
            ("/a///b//", "/a/b/"),
            ("//", "/"),
            // Dot segments removed, `%2E` ones too.
            ("/./admin/panel", "/admin/panel"),
            ("/x/../admin/panel", "/admin/panel"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/.", "/"),
            ("/a/%2e%2e/b", "/b"),
            ("/a/.%2E/b", "/b"),
            ("/a/%2e/b", "/a/b"),
            // Slashes merge before `..` counts segments, as in nginx (Envoy pops the empty
            // segment and gives `/a/b`): either way, filters and upstream see the same path.
            ("/a//../b", "/b"),
            // A `%2F` is not a separator: `..%2F` is no dot segment.
            ("/a/..%2fb", "/a/..%2Fb"),
            // Names that only look like dot segments.
            ("/a/.../b", "/a/.../b"),
            ("/a/..b/.c", "/a/..b/.c"),
        ];
        for (raw, canonical) in table {
            assert_eq!(normalize(raw).as_deref(), Ok(canonical), "{raw}");
            // Canonical is a fixed point, taken as is.
            assert!(
                matches!(normalize(canonical), Ok(Cow::Borrowed(_))),
                "{canonical}"
            );
        }
    }

    #[test]
    fn canonical_paths_are_borrowed() {
        for path in [
            "/",
            "/admin/panel",
            "/a/b/",
            "/a%2Fb",
            "/%20",
            "/a/...",
            "/é",
        ] {
            assert!(
                matches!(normalize(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn paths_without_a_canonical_form_are_refused() {
        for path in [
            "/..",
            "/../x",
            "/a/../../x",
            "/%2e%2e/x",
            "//../x",
            "/a/b/../../..",
        ] {
            assert_eq!(normalize(path), Err(PathError::AboveRoot), "{path}");
        }
        for path in ["/%", "/%4", "/%zz", "/a%g1", "/a%2"] {
            assert_eq!(normalize(path), Err(PathError::BadEscape), "{path}");
        }
    }

    fn parts(target: &str) -> http::request::Parts {
        http::Request::get(target).body(()).unwrap().into_parts().0
    }

    #[test]
    fn requests_keep_their_query_and_non_path_targets() {
        let mut req = parts("/x/../%61dmin//panel?next=/a/../b&q=%61");
        normalize_request(&mut req).unwrap();
        assert_eq!(req.uri, "/admin/panel?next=/a/../b&q=%61");
        let mut req = parts("http://example.test//a/./b?x");
        normalize_request(&mut req).unwrap();
        assert_eq!(req.uri, "http://example.test/a/b?x");
        let mut req = parts("*");
        normalize_request(&mut req).unwrap();
        assert_eq!(req.uri, "*");
        let error = normalize_request(&mut parts("/../etc/passwd")).unwrap_err();
        assert_eq!((error.kind, error.status), (ErrorKind::InvalidRequest, 400));
    }
}
