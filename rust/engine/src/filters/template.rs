//! Templates in filter values: `https://{host}{path}`, `/v2/{1}`, `{request_id}`. Parsed once
//! at start-up (an unknown placeholder is a configuration error), rendered per request.

use crate::lb::ConfigError;

/// The placeholders every template may use, whatever its filter.
pub const PLACEHOLDERS: &[&str] = &["host", "path", "query", "request_id"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The request's host as the client named it, without its port (nginx's `$host`).
    Host,
    /// The path, without the query.
    Path,
    /// The query, without its `?` (empty when there is none).
    Query,
    /// The request's id (see [`super::RequestId`]).
    RequestId,
    /// A regex capture group, by number.
    Group(usize),
    /// A regex capture group, by name.
    Named(String),
}

/// What a template needs from the request when it is rendered.
pub struct Values<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub request_id: &'a str,
    pub captures: Option<&'a regex::Captures<'a>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    /// A literal template as a header value, made once: a header filter with a fixed value
    /// then costs a clone per request, not a rendering and a check.
    literal_value: Option<http::HeaderValue>,
}

/// The capture groups a template may name: those of the regex its filter matches with.
#[derive(Debug, Clone, Copy, Default)]
pub struct Groups<'a> {
    regex: Option<&'a regex::Regex>,
}

impl<'a> Groups<'a> {
    pub fn of(regex: Option<&'a regex::Regex>) -> Self {
        Groups { regex }
    }

    fn has_number(&self, n: usize) -> bool {
        self.regex.is_some_and(|r| n < r.captures_len())
    }

    fn has_name(&self, name: &str) -> bool {
        self.regex
            .is_some_and(|r| r.capture_names().flatten().any(|n| n == name))
    }
}

impl Template {
    /// Parse `text`, the value of `field` (named in errors); `{{` and `}}` are literal
    /// braces. `groups` are the regex captures it may name (`{1}`, `{name}`).
    pub fn parse(field: &str, text: &str, groups: Groups<'_>) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::new(field, message);
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let brace = rest.as_bytes()[at];
            let after = &rest[at + 1..];
            if after.as_bytes().first() == Some(&brace) {
                literal.push(brace as char);
                rest = &after[1..];
                continue;
            }
            if brace == b'}' {
                return Err(bad(format!("unmatched '}}' in {text:?} (write '}}}}')")));
            }
            let end = after
                .find('}')
                .ok_or_else(|| bad(format!("unclosed '{{' in {text:?} (write '{{{{')")))?;
            let name = &after[..end];
            let part = match name {
                "host" => Part::Host,
                "path" => Part::Path,
                "query" => Part::Query,
                "request_id" => Part::RequestId,
                _ => match name.parse::<usize>() {
                    Ok(n) if groups.has_number(n) => Part::Group(n),
                    Err(_) if groups.has_name(name) => Part::Named(name.to_owned()),
                    _ => return Err(bad(format!("unknown placeholder {{{name}}}"))),
                },
            };
            if !literal.is_empty() {
                parts.push(Part::Literal(std::mem::take(&mut literal)));
            }
            parts.push(part);
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        let literal_value = match parts.as_slice() {
            [] => Some(http::HeaderValue::from_static("")),
            [Part::Literal(text)] => http::HeaderValue::try_from(text.as_str()).ok(),
            _ => None,
        };
        Ok(Template {
            parts,
            literal_value,
        })
    }

    /// The literal text, when the template has no placeholder (rendered once, at start-up).
    pub fn as_literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [] => Some(""),
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// Whether it renders a request path: it starts with `/` or `{path}`.
    pub fn is_path(&self) -> bool {
        match self.parts.first() {
            Some(Part::Literal(text)) => text.starts_with('/'),
            Some(Part::Path) => true,
            _ => false,
        }
    }

    pub fn uses_captures(&self) -> bool {
        self.parts
            .iter()
            .any(|p| matches!(p, Part::Group(_) | Part::Named(_)))
    }

    /// A literal template's header value (None when it is not literal, or not a valid one).
    pub fn literal_value(&self) -> Option<&http::HeaderValue> {
        self.literal_value.as_ref()
    }

    /// Whether the template is `{request_id}` alone.
    pub fn is_request_id(&self) -> bool {
        self.parts == [Part::RequestId]
    }

    pub fn uses_host(&self) -> bool {
        self.parts.contains(&Part::Host)
    }

    pub fn uses_request_id(&self) -> bool {
        self.parts.contains(&Part::RequestId)
    }

    pub fn render(&self, values: &Values<'_>) -> String {
        fn group<'t>(m: Option<regex::Match<'t>>) -> &'t str {
            m.map_or("", |m| m.as_str())
        }
        let mut out = String::new();
        for part in &self.parts {
            out.push_str(match part {
                Part::Literal(text) => text,
                Part::Host => values.host,
                Part::Path => values.path,
                Part::Query => values.query,
                Part::RequestId => values.request_id,
                Part::Group(n) => group(values.captures.and_then(|c| c.get(*n))),
                Part::Named(name) => group(values.captures.and_then(|c| c.name(name))),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<'a>(captures: Option<&'a regex::Captures<'a>>) -> Values<'a> {
        Values {
            host: "example.com",
            path: "/a/b",
            query: "x=1",
            request_id: "rid",
            captures,
        }
    }

    #[test]
    fn renders_placeholders_and_braces() {
        let t = Template::parse(
            "f",
            "https://{host}{path}?{query}#{request_id}{{}}",
            Groups::default(),
        )
        .unwrap();
        assert_eq!(t.render(&values(None)), "https://example.com/a/b?x=1#rid{}");
        assert_eq!(
            Template::parse("f", "plain", Groups::default())
                .unwrap()
                .as_literal(),
            Some("plain")
        );
    }

    #[test]
    fn renders_captures_by_number_and_name() {
        let re = regex::Regex::new(r"^/old/(?P<rest>.*)/(\d+)$").unwrap();
        let t = Template::parse("f", "/new/{rest}/{2}/{0}", Groups::of(Some(&re))).unwrap();
        assert!(t.uses_captures());
        let caps = re.captures("/old/x/y/42").unwrap();
        assert_eq!(t.render(&values(Some(&caps))), "/new/x/y/42//old/x/y/42");
    }

    #[test]
    fn refuses_unknown_placeholders_and_stray_braces() {
        let re = regex::Regex::new(r"(a)").unwrap();
        for (text, groups) in [
            ("{hots}", Groups::default()),
            ("{1}", Groups::default()),
            ("{2}", Groups::of(Some(&re))),
            ("{name}", Groups::of(Some(&re))),
            ("a{b", Groups::default()),
            ("a}b", Groups::default()),
        ] {
            assert!(Template::parse("f", text, groups).is_err(), "{text:?}");
        }
        let error = Template::parse("f", "https://{hots}", Groups::default()).unwrap_err();
        assert_eq!(error.message, "unknown placeholder {hots}");
    }
}
