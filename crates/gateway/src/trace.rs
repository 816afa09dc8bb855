//! Request identity: the `x-amzn-RequestId` every answer carries, as AWS's, and the W3C
//! `traceparent` the upstream receives (the client's trace continued, or a new one started).

use std::cell::Cell;
use std::hash::{BuildHasher as _, Hasher as _};

/// A request's id: 128 bits, shown as a UUID (version 4 layout) and used as the trace id of a trace
/// the gateway starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    /// The 128 bits in hex: the trace id of a trace the gateway starts.
    hex: [u8; 32],
    /// The UUID form.
    text: [u8; 36],
}

thread_local! {
    /// This thread's two random seeds and its count of ids made.
    static IDS: Cell<(u64, u64, u64)> = Cell::new(seeds());
}

/// Random seeds from the standard library's hasher keys (taken from the OS once per thread), so
/// that making an id costs no system call and no shared counter.
fn seeds() -> (u64, u64, u64) {
    let mut a = std::collections::hash_map::RandomState::new().build_hasher();
    a.write_u8(1);
    let mut b = std::collections::hash_map::RandomState::new().build_hasher();
    b.write_u8(2);
    (a.finish(), b.finish(), 0)
}

/// SplitMix64's finaliser: a bijection of `u64`, so distinct inputs give distinct outputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// 64 fresh bits: unique on this thread for 2^64 calls, unpredictable to a client.
fn fresh() -> [u64; 2] {
    IDS.with(|ids| {
        let (s1, s2, n) = ids.get();
        ids.set((s1, s2, n.wrapping_add(1)));
        [mix(n ^ s1), mix(n.wrapping_add(s2))]
    })
}

/// `v` as 16 lower-case hex digits. Hand-rolled: each request formats three of these, and the
/// `hex` crate's byte-at-a-time loop cost ~100 instructions apiece (bench/instructions.sh); this
/// spreads the nibbles into bytes and maps them to digits all at once.
fn hex16(v: u64) -> [u8; 16] {
    // Nibble i of `x` (most significant first) into byte i of the result, big-endian.
    fn spread(x: u32) -> u64 {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    fn digits(n: u64) -> [u8; 8] {
        // 1 in each byte whose nibble is 10 or more, which then skips to 'a'.
        let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        (n + 0x3030_3030_3030_3030 + letters * (u64::from(b'a') - u64::from(b'9') - 1))
            .to_be_bytes()
    }
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&digits(spread((v >> 32) as u32)));
    out[8..].copy_from_slice(&digits(spread(v as u32)));
    out
}

impl RequestId {
    /// A new id, unique within this process (and, with overwhelming odds, beyond it).
    pub fn new() -> Self {
        let [mut hi, mut lo] = fresh();
        // Version 4, variant 10: the shape of AWS's ids.
        hi = (hi & !0xf000) | 0x4000;
        lo = (lo & !(0b11 << 62)) | (0b10 << 62);
        let mut hex = [0u8; 32];
        hex[..16].copy_from_slice(&hex16(hi));
        hex[16..].copy_from_slice(&hex16(lo));
        let mut text = [b'-'; 36];
        text[0..8].copy_from_slice(&hex[0..8]);
        text[9..13].copy_from_slice(&hex[8..12]);
        text[14..18].copy_from_slice(&hex[12..16]);
        text[19..23].copy_from_slice(&hex[16..20]);
        text[24..36].copy_from_slice(&hex[20..32]);
        Self { hex, text }
    }

    /// The id as AWS shows it: `xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx`.
    pub fn as_str(&self) -> &str {
        // Built from ASCII hex digits and dashes only.
        std::str::from_utf8(&self.text).unwrap_or_default()
    }

    /// Appends the upstream's trace fields: `x-amzn-requestid`, and `traceparent` continuing the
    /// client's valid `traceparent` (same trace and flags, the gateway as the new parent, and the
    /// client's `tracestate` with it) or starting a trace whose id is this request's (a `tracestate`
    /// describes the trace it came with, so it goes when that trace does).
    pub fn upstream_fields(
        &self,
        client_traceparent: Option<&[u8]>,
        client_tracestate: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) {
        out.extend_from_slice(b"x-amzn-requestid: ");
        out.extend_from_slice(&self.text);
        out.extend_from_slice(b"\r\ntraceparent: 00-");
        let span = hex16(fresh()[0] | 1);
        match client_traceparent.and_then(parse_traceparent) {
            Some((trace, flags)) => {
                out.extend_from_slice(trace);
                out.push(b'-');
                out.extend_from_slice(&span);
                out.push(b'-');
                out.extend_from_slice(flags);
                if let Some(state) = client_tracestate {
                    out.extend_from_slice(b"\r\ntracestate: ");
                    out.extend_from_slice(state);
                }
            }
            None => {
                out.extend_from_slice(&self.hex);
                out.push(b'-');
                out.extend_from_slice(&span);
                // Not sampled: the gateway records no spans of its own.
                out.extend_from_slice(b"-00");
            }
        }
        out.extend_from_slice(b"\r\n");
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The trace id and flags of a valid W3C `traceparent` (version `00`, or a later one read as `00`
/// reads it, Trace Context §4.3), `None` for anything else.
fn parse_traceparent(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let v = v.trim_ascii();
    if v.len() < 55 || (v.len() > 55 && (v.starts_with(b"00") || v[55] != b'-')) {
        return None;
    }
    let lower_hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    let (version, trace, parent, flags) = (&v[0..2], &v[3..35], &v[36..52], &v[53..55]);
    let dashes = v[2] == b'-' && v[35] == b'-' && v[52] == b'-';
    let valid = dashes
        && lower_hex(version)
        && version != b"ff"
        && lower_hex(trace)
        && !zero(trace)
        && lower_hex(parent)
        && !zero(parent)
        && lower_hex(flags);
    valid.then_some((trace, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_digits_are_the_formatters() {
        for v in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xdead_beef,
            u64::MAX,
            0x0123_4567_89ab_cdef,
        ] {
            assert_eq!(std::str::from_utf8(&hex16(v)).unwrap(), format!("{v:016x}"));
        }
        for _ in 0..10_000 {
            let v = fresh()[0];
            assert_eq!(std::str::from_utf8(&hex16(v)).unwrap(), format!("{v:016x}"));
        }
    }

    #[test]
    fn ids_are_uuids_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = RequestId::new();
            let s = id.as_str();
            assert_eq!(s.len(), 36);
            assert_eq!(&s[14..15], "4", "{s}");
            assert!(matches!(&s[19..20], "8" | "9" | "a" | "b"), "{s}");
            assert!(
                s.bytes()
                    .enumerate()
                    .all(|(i, b)| if [8, 13, 18, 23].contains(&i) {
                        b == b'-'
                    } else {
                        b.is_ascii_hexdigit() && !b.is_ascii_uppercase()
                    })
            );
            assert!(seen.insert(id.text), "{s} twice");
        }
        // Other threads draw from seeds of their own.
        let other =
            std::thread::spawn(|| (0..1000).map(|_| RequestId::new().text).collect::<Vec<_>>())
                .join()
                .unwrap();
        assert!(other.iter().all(|t| seen.insert(*t)));
    }

    fn fields(id: &RequestId, client: Option<&str>) -> String {
        let mut out = Vec::new();
        id.upstream_fields(client.map(str::as_bytes), Some(b"vendor=state"), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn traceparent_is_continued_or_started() {
        let id = RequestId::new();
        let trace_of_id = id.as_str().replace('-', "");
        let started = fields(&id, None);
        let lines: Vec<&str> = started.lines().collect();
        assert_eq!(lines[0], format!("x-amzn-requestid: {id}"));
        let tp = lines[1].strip_prefix("traceparent: ").unwrap();
        assert_eq!(tp.len(), 55);
        assert_eq!(&tp[..3], "00-");
        assert_eq!(&tp[3..35], trace_of_id, "a new trace is the request's id");
        assert_eq!(&tp[52..], "-00");

        let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let continued = fields(&id, Some(client));
        let tp = continued
            .lines()
            .nth(1)
            .unwrap()
            .strip_prefix("traceparent: ")
            .unwrap();
        assert_eq!(&tp[..36], "00-4bf92f3577b34da6a3ce929d0e0e4736-");
        assert_ne!(
            &tp[36..52],
            "00f067aa0ba902b7",
            "the gateway is the new parent"
        );
        assert_eq!(&tp[52..], "-01", "the client's flags are kept");
        assert!(
            continued.ends_with("\r\ntracestate: vendor=state\r\n"),
            "{continued}"
        );
        // A later version with more fields is read as version 00 reads it.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(fields(&id, Some(later)).contains("-4bf92f3577b34da6a3ce929d0e0e4736-"));

        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            let tp = fields(&id, Some(bad));
            assert!(tp.contains(&trace_of_id), "{bad:?} is not continued: {tp}");
            assert!(
                !tp.contains("tracestate"),
                "{bad:?}: its tracestate goes with it"
            );
        }
    }
}
