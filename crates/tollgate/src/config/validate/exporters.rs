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
