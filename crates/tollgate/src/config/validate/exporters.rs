//! `exporters:`: where usage is exported, each under a name of its own, in windows a day holds a
//! whole number of.

use serde_saphyr::Spanned;
use tollgate_core::quota::SECS_PER_DAY;
use tollgate_gateway::exporters::{Exporter, FileFormat, Sink};

use super::{ConfigError, Ctx, http_url, positive_duration};
use crate::config::raw::RawExporter;

/// A window's length unless an exporter says otherwise.
const DEFAULT_INTERVAL: i64 = 3_600;

/// Where Stripe's API is.
const STRIPE_API: &str = "https://api.stripe.com";

/// The CloudEvents `type` unless `eventName` says otherwise.
const DEFAULT_EVENT_TYPE: &str = "api_requests";

pub(super) fn validate_exporters(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawExporter>],
) -> Result<Vec<Exporter>, ConfigError> {
    let mut exporters: Vec<Exporter> = Vec::with_capacity(raw.len());
    for (i, e) in raw.iter().enumerate() {
        let (field, at, e) = (format!("exporters[{i}]"), &e.referenced, &e.value);
        // The name is part of store keys and file names.
        let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if e.name.is_empty()
            || !e.name.chars().all(plain)
            || exporters.iter().any(|o| o.name == e.name)
        {
            return cx.err(
                at,
                format!("{field}.name"),
                format!(
                    "{:?}: an exporter needs a name of its own, of letters, digits, - and _",
                    e.name
                ),
            );
        }
        let interval = match &e.interval {
            None => DEFAULT_INTERVAL,
            Some(t) => {
                let d = positive_duration(cx, t, at, &format!("{field}.interval"))?;
                match i64::try_from(d.as_secs()) {
                    Ok(secs) if d.subsec_nanos() == 0 && SECS_PER_DAY % secs == 0 => secs,
                    _ => {
                        return cx.err(
                            at,
                            format!("{field}.interval"),
                            format!("{t:?}: a day must hold a whole number of windows (e.g. 1m, 5m, 1h, 1d)"),
                        );
                    }
                }
            }
        };
        let secret = e
            .secret
            .as_ref()
            .map(|s| s.0.clone())
            .filter(|s| !s.is_empty());
        // Each type's fields, and none of the others'.
        let given = [
            ("path", e.path.is_some()),
            ("format", e.format.is_some()),
            ("url", e.url.is_some()),
            ("secret", e.secret.is_some()),
            ("eventName", e.event_name.is_some()),
        ];
        let takes: &[&str] = match e.kind.as_str() {
            "file" => &["path", "format"],
            "cloudevents" => &["url", "secret", "eventName"],
            "stripe" => &["url", "secret", "eventName"],
            other => {
                return cx.err(
                    at,
                    format!("{field}.type"),
                    format!("{other:?} is not one of file, cloudevents, stripe"),
                );
            }
        };
        if let Some((name, _)) = given.iter().find(|(n, set)| *set && !takes.contains(n)) {
            return cx.err(
                at,
                format!("{field}.{name}"),
                format!("a {} exporter takes {}", e.kind, takes.join(", ")),
            );
        }
        let url_field = format!("{field}.url");
        let sink = match e.kind.as_str() {
            "file" => {
                let Some(path) = e.path.as_deref().filter(|p| !p.is_empty()) else {
                    return cx.err(
                        at,
                        format!("{field}.path"),
                        "give the directory the files go to, e.g. ./usage",
                    );
                };
                let format = match &e.format {
                    None => FileFormat::Ndjson,
                    Some(f) => cx.one_of(&FileFormat::NAMES, f, at, format!("{field}.format"))?,
                };
                Sink::File {
                    dir: cx.path(path),
                    format,
                }
            }
            "cloudevents" => {
                let Some(url) = &e.url else {
                    return cx.err(
                        at,
                        &url_field,
                        "give the URL events are POSTed to, e.g. OpenMeter's https://openmeter.cloud/api/v1/events",
                    );
                };
                Sink::CloudEvents {
                    url: http_url(cx, &url.0, at, &url_field)?,
                    secret,
                    event_type: e
                        .event_name
                        .clone()
                        .unwrap_or_else(|| DEFAULT_EVENT_TYPE.into()),
                    tls: cx.delivery_tls(at, &url_field)?,
                }
            }
            _ => {
                let Some(secret) = secret else {
                    return cx.err(
                        at,
                        format!("{field}.secret"),
                        "give Stripe's secret key, e.g. \"${STRIPE_KEY}\"",
                    );
                };
                let Some(event_name) = e.event_name.clone().filter(|n| !n.is_empty()) else {
                    return cx.err(
                        at,
                        format!("{field}.eventName"),
                        "give the event_name of the Stripe meter usage goes to",
                    );
                };
                let url = e.url.as_ref().map_or(STRIPE_API, |u| u.0.as_str());
                Sink::Stripe {
                    url: http_url(cx, url, at, &url_field)?,
                    secret,
                    event_name,
                    tls: cx.delivery_tls(at, &url_field)?,
                }
            }
        };
        exporters.push(Exporter {
            name: e.name.clone(),
            sink,
            interval,
        });
    }
    Ok(exporters)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use tollgate_gateway::exporters::{FileFormat, Sink};

    /// Exporters are checked where they are written, naming the field.
    #[test]
    fn exporters_are_checked() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let with = |exporter: &str| format!("listen: 127.0.0.1:0\nexporters:\n  - {exporter}\n");
        let field = |exporter: &str| {
            crate::config::parse(file, &with(exporter))
                .unwrap_err()
                .field
        };
        let cases = [
            ("{ name: a, type: file }", "exporters[0].path"),
            ("{ name: a/b, type: file, path: u }", "exporters[0].name"),
            (
                "{ name: a, type: file, path: u, format: xml }",
                "exporters[0].format",
            ),
            (
                "{ name: a, type: file, path: u, interval: 7m }",
                "exporters[0].interval",
            ),
            (
                "{ name: a, type: file, path: u, interval: 1500ms }",
                "exporters[0].interval",
            ),
            (
                "{ name: a, type: file, path: u, url: \"http://h/\" }",
                "exporters[0].url",
            ),
            ("{ name: a, type: kafka }", "exporters[0].type"),
            ("{ name: a, type: cloudevents }", "exporters[0].url"),
            (
                "{ name: a, type: cloudevents, url: \"ftp://h/\" }",
                "exporters[0].url",
            ),
            (
                "{ name: a, type: cloudevents, url: \"http://h/\", path: u }",
                "exporters[0].path",
            ),
            (
                "{ name: a, type: stripe, eventName: e }",
                "exporters[0].secret",
            ),
            (
                "{ name: a, type: stripe, secret: s }",
                "exporters[0].eventName",
            ),
        ];
        for (exporter, expected) in cases {
            assert_eq!(field(exporter), expected, "{exporter}");
        }
        let twice = "{ name: a, type: file, path: u }\n  - { name: a, type: file, path: v }";
        assert_eq!(field(twice), "exporters[1].name");

        let ok = "{ name: ledger, type: file, path: usage, format: csv, interval: 5m }\n  - { name: billing, type: stripe, secret: sk, eventName: api_requests }";
        let c = crate::config::parse(file, &with(ok)).unwrap();
        let [ledger, billing] = &c.gateway.exporters[..] else {
            panic!("{:?}", c.gateway.exporters)
        };
        assert_eq!(ledger.interval, 300);
        assert!(
            matches!(&ledger.sink, Sink::File { dir, format: FileFormat::Csv } if dir == Path::new("/nonexistent/usage"))
        );
        assert_eq!(billing.interval, 3_600);
        assert!(
            matches!(&billing.sink, Sink::Stripe { url, .. } if url == "https://api.stripe.com")
        );
    }
}
