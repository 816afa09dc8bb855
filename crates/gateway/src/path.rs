//! Request path normalisation (RFC 3986 §6.2.2), done before routing so that the path the gateway
//! routes is exactly the path it forwards: an upstream that decodes and normalises paths (as nginx and
//! most frameworks do) can never see a different resource from the one that was admitted.
//!
//! The rules, in the order a byte meets them:
//! - `%XX` of an unreserved character (letter, digit, `-`, `_`, `~`) is decoded; other escapes stay
//!   encoded, with upper-case hex digits.
//! - Refused: `%2E` (an encoded dot: only attacks use it), `%00` and raw control characters, a raw
//!   `\`, `;` (path parameters, which Java servers strip before routing), `#`, and invalid escapes.
//!   `%2F` and `%5C` (encoded slashes) are kept as they are and reported, so the caller can refuse
//!   them unless the API allows them; they are never decoded, and a `.` or `..` between them is
//!   refused (it would be a dot segment to an upstream that decodes them).
//! - Characters RFC 3986 does not allow in a path segment are percent-encoded.
//! - Empty segments are dropped (`//` is `/`, as nginx's `merge_slashes`), `.` segments removed, and
//!   `..` removes the segment before it; a `..` with nothing left to remove is refused.
//!
//! Hand-written rather than built on `percent-encoding`: that crate decodes every escape, while this
//! rule decodes some, keeps others and refuses a few, in one pass over the bytes.

use crate::http1::{HeadError, byte_set};

/// Why a request path cannot be normalised safely. Every variant is a 400.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2E`: an encoded dot.
    EncodedDot,
    /// `%00`, or a raw control character.
    Nul,
    /// A `%` not followed by two hex digits.
    InvalidEscape,
    /// A raw backslash.
    Backslash,
    /// A `;` (path parameter) or `#` (fragment).
    Delimiter,
    /// A `..` segment climbing above the root or the stage's base path.
    AboveBase,
    /// `%2F` or `%5C` where the API does not allow encoded slashes.
    EncodedSlash,
    /// A `.` or `..` between encoded slashes: a dot segment for an upstream that decodes them.
    DotBesideEncodedSlash,
}

impl PathError {
    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            PathError::EncodedDot => "Invalid request path: encoded dot (%2E)",
            PathError::Nul => "Invalid request path: NUL or control character",
            PathError::InvalidEscape => "Invalid request path: invalid percent-encoding",
            PathError::Backslash => "Invalid request path: backslash",
            PathError::Delimiter => "Invalid request path: ';' or '#' in the path",
            PathError::AboveBase => "Invalid request path: '..' above the base path",
            PathError::EncodedSlash => "Invalid request path: encoded slash (%2F or %5C)",
            PathError::DotBesideEncodedSlash => {
                "Invalid request path: dot segment between encoded slashes"
            }
        }
    }
}

impl From<PathError> for HeadError {
    fn from(e: PathError) -> Self {
        HeadError::Malformed(e.message())
    }
}

/// What normalisation saw besides the path itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathFacts {
    /// The fewest segments the path was left with after a `..` (`usize::MAX` when there was none):
    /// a stage whose base path has more segments was climbed out of.
    pub min_depth: usize,
    /// Whether the path holds `%2F` or `%5C`.
    pub encoded_slash: bool,
}

impl PathFacts {
    const CLEAN: PathFacts = PathFacts {
        min_depth: usize::MAX,
        encoded_slash: false,
    };
}

/// Bytes allowed raw in a canonical path segment (RFC 3986 `pchar` minus `%` and `;`): unreserved,
/// the other sub-delims, `:` and `@`.
static SEGMENT_BYTE: [bool; 256] = byte_set(b"-._~!$&'()*+,=:@");

fn is_segment_byte(b: u8) -> bool {
    SEGMENT_BYTE[usize::from(b)]
}

fn is_unreserved_but_dot(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn push_escaped(out: &mut Vec<u8>, b: u8) {
    out.extend_from_slice(&[
        b'%',
        HEX_UPPER[usize::from(b >> 4)],
        HEX_UPPER[usize::from(b & 15)],
    ]);
}

/// Whether `path` is already canonical: starts with `/`, no escapes, no dot segments, no empty
/// segment but a trailing one, nothing to encode or refuse. Most requests are, and are routed
/// without a copy.
fn is_canonical(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/") else {
        return false;
    };
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        match seg {
            b"" if segments.peek().is_some() => return false,
            b"." | b".." => return false,
            _ if !seg.iter().all(|&b| is_segment_byte(b)) => return false,
            _ => {}
        }
    }
    true
}

/// Normalises the request path `path` (without its query). Returns `None` when it is already
/// canonical (route it as it is), else leaves the canonical form in `out`. The result always starts
/// with `/`.
pub fn normalize(path: &[u8], out: &mut Vec<u8>) -> Result<Option<PathFacts>, PathError> {
    if is_canonical(path) {
        return Ok(None);
    }
    out.clear();
    let mut facts = PathFacts::CLEAN;
    // Start offsets in `out` of the segments kept so far; each segment is written as `/seg`.
    let mut starts: Vec<usize> = Vec::new();
    let mut trailing_slash = false;
    let body = path.strip_prefix(b"/").unwrap_or(path);
    let mut segments = body.split(|&b| b == b'/').peekable();
    while let Some(raw) = segments.next() {
        let last = segments.peek().is_none();
        match raw {
            b"" | b"." => trailing_slash = last,
            b".." => {
                let Some(start) = starts.pop() else {
                    return Err(PathError::AboveBase);
                };
                out.truncate(start);
                facts.min_depth = facts.min_depth.min(starts.len());
                trailing_slash = last;
            }
            _ => {
                starts.push(out.len());
                out.push(b'/');
                segment(raw, out, &mut facts)?;
                trailing_slash = false;
            }
        }
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    Ok(Some(facts))
}

/// Appends the canonical form of one segment.
fn segment(raw: &[u8], out: &mut Vec<u8>, facts: &mut PathFacts) -> Result<(), PathError> {
    // Where the part of the segment after the last encoded slash starts in `out`: an upstream that
    // decodes `%2F` sees that part as a segment of its own, so it must not be `.` or `..`.
    let mut part = out.len();
    let dot_part = |part: &[u8]| part == b"." || part == b"..";
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        match b {
            b'%' => {
                let (Some(h), Some(l)) = (
                    raw.get(i + 1).copied().and_then(hex),
                    raw.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::InvalidEscape);
                };
                let decoded = h << 4 | l;
                match decoded {
                    b'.' => return Err(PathError::EncodedDot),
                    0 => return Err(PathError::Nul),
                    b'/' | b'\\' => {
                        if dot_part(&out[part..]) {
                            return Err(PathError::DotBesideEncodedSlash);
                        }
                        facts.encoded_slash = true;
                        push_escaped(out, decoded);
                        part = out.len();
                    }
                    d if is_unreserved_but_dot(d) => out.push(d),
                    d => push_escaped(out, d),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            b if b < 0x20 || b == 0x7f => return Err(PathError::Nul),
            b';' | b'#' => return Err(PathError::Delimiter),
            b if is_segment_byte(b) => out.push(b),
            b => push_escaped(out, b),
        }
        i += 1;
    }
    if facts.encoded_slash && dot_part(&out[part..]) {
        return Err(PathError::DotBesideEncodedSlash);
    }
    Ok(())
}

/// How many segments `base` (a stage's base path such as `/prod` or `/`) has.
pub fn depth(base: &str) -> usize {
    base.split('/').filter(|s| !s.is_empty()).count()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn norm(path: &str) -> Result<String, PathError> {
        let mut out = Vec::new();
        Ok(match normalize(path.as_bytes(), &mut out)? {
            None => path.to_string(),
            Some(_) => String::from_utf8(out).unwrap(),
        })
    }

    #[test]
    fn canonical_paths_are_left_alone() {
        for p in [
            "/",
            "/prod",
            "/prod/registrations/42/warranty",
            "/prod/a/",
            "/prod/a.b/..c/...",
            "/prod/x~y_z-1/@:!$&'()*+,=",
        ] {
            let mut out = Vec::new();
            assert_eq!(normalize(p.as_bytes(), &mut out), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        let cases = [
            (
                "/prod/files/../registrations/1/warranty",
                "/prod/registrations/1/warranty",
            ),
            ("/prod/./a/./b/.", "/prod/a/b/"),
            ("/prod/a/b/..", "/prod/a/"),
            (
                "/prod//registrations//1///warranty",
                "/prod/registrations/1/warranty",
            ),
            ("//", "/"),
            ("/prod/a//", "/prod/a/"),
            ("/prod/a//../b", "/prod/b"),
            ("/..a/b..", "/..a/b.."),
            ("/...", "/..."),
        ];
        for (raw, want) in cases {
            assert_eq!(norm(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(norm("/.."), Err(PathError::AboveBase));
        assert_eq!(norm("/prod/../.."), Err(PathError::AboveBase));
    }

    #[test]
    fn escapes() {
        assert_eq!(
            norm("/prod/%72egistrations/%7e%41").as_deref(),
            Ok("/prod/registrations/~A")
        );
        assert_eq!(
            norm("/prod/a%20b%c3%a9").as_deref(),
            Ok("/prod/a%20b%C3%A9")
        );
        assert_eq!(norm("/prod/%252F").as_deref(), Ok("/prod/%252F"));
        assert_eq!(norm("/prod/é\"{").as_deref(), Ok("/prod/%C3%A9%22%7B"));
        for (raw, err) in [
            (
                "/prod/items/..%2Fregistrations",
                PathError::DotBesideEncodedSlash,
            ),
            ("/prod/items/a%2F..", PathError::DotBesideEncodedSlash),
            ("/prod/items/a%5C.%5Cb", PathError::DotBesideEncodedSlash),
            ("/prod/%2e%2e/x", PathError::EncodedDot),
            ("/prod/a%00", PathError::Nul),
            ("/prod/a%zz", PathError::InvalidEscape),
            ("/prod/a%2", PathError::InvalidEscape),
            ("/prod/a%", PathError::InvalidEscape),
            ("/prod\\..\\x", PathError::Backslash),
            ("/prod/registrations;x=1/1", PathError::Delimiter),
            ("/prod/a#b", PathError::Delimiter),
        ] {
            assert_eq!(norm(raw), Err(err), "{raw}");
        }
        let mut out = Vec::new();
        let facts = normalize(b"/prod/a%2fb%5Cc", &mut out).unwrap().unwrap();
        assert!(facts.encoded_slash);
        assert_eq!(out, b"/prod/a%2Fb%5Cc");
    }

    #[test]
    fn depth_after_dot_dot_is_reported() {
        let mut out = Vec::new();
        let facts = normalize(b"/prod/../dev/x", &mut out).unwrap().unwrap();
        assert_eq!((facts.min_depth, &out[..]), (0, &b"/dev/x"[..]));
        let facts = normalize(b"/prod/a/../b", &mut out).unwrap().unwrap();
        assert_eq!(facts.min_depth, 1);
        assert_eq!(depth("/prod"), 1);
        assert_eq!(depth("/"), 0);
        assert_eq!(depth("/a/b/"), 2);
    }

    fn path_bytes() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"/".to_vec()),
            Just(b"..".to_vec()),
            Just(b".".to_vec()),
            Just(b"%2e".to_vec()),
            Just(b"%2F".to_vec()),
            Just(b"%5c".to_vec()),
            Just(b"%41".to_vec()),
            Just(b"%25".to_vec()),
            Just(b"%".to_vec()),
            Just(b";".to_vec()),
            "[a-z]{1,3}".prop_map(String::into_bytes),
            any::<u8>().prop_map(|b| vec![b]),
        ];
        proptest::collection::vec(piece, 0..24).prop_map(|parts| {
            let mut p = vec![b'/'];
            p.extend(parts.concat());
            p
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Normalising never panics; a normalised path is canonical, normalises to itself, has no dot
        /// segments left and never climbs above where it started.
        #[test]
        fn normalisation_is_idempotent_and_stays_below_the_root(path in path_bytes()) {
            let mut out = Vec::new();
            let Ok(facts) = normalize(&path, &mut out) else { return Ok(()) };
            let once = if facts.is_some() { out.clone() } else { path.clone() };
            prop_assert_eq!(once.first(), Some(&b'/'));
            let mut again = Vec::new();
            let twice = match normalize(&once, &mut again) {
                Ok(Some(_)) => again,
                Ok(None) => once.clone(),
                Err(e) => return Err(TestCaseError::fail(format!("{e:?}"))),
            };
            prop_assert_eq!(&twice, &once, "{:?}", String::from_utf8_lossy(&once));
            for seg in once.split(|&b| b == b'/') {
                prop_assert!(seg != b"." && seg != b"..");
            }
            // Every `..` was matched by a segment before it.
            let mut depth = 0i64;
            for seg in path[1..].split(|&b| b == b'/') {
                match seg {
                    b".." => depth -= 1,
                    b"" | b"." => {}
                    _ => depth += 1,
                }
                prop_assert!(depth >= 0);
            }
        }
    }
}
