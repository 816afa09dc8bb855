use crate::util::{self, Gateway, KEY, Nginx};

/// nginx as the upstream: it decodes and normalises paths, as most servers do, answers every request
/// with the path it resolved, and logs what it received, what it resolved, and the key it was sent.
fn normalising_upstream() -> Option<Nginx> {
    Nginx::start(
        "log_format seen '$request_uri|$uri|$http_x_api_key';\n\
         access_log {DIR}/seen.log seen;\n\
         server { listen 127.0.0.1:{PORT}; location / { return 200 \"$uri\"; } }",
    )
}

fn config(upstream: &str) -> String {
    util::config_with_routes(
        &format!(
            r#"      - {{ path: "/items/{{id}}", method: GET, upstream: "http://{upstream}" }}
      - {{ path: "/files/{{path+}}", method: GET, upstream: "http://{upstream}" }}
      - {{ path: "/registrations/{{id}}/warranty", method: ANY, apiKeyRequired: true, upstream: "http://{upstream}" }}
      - {{ path: "/admin/{{proxy+}}", method: ANY, apiKeyRequired: true, upstream: "http://{upstream}/admin" }}
"#
        ),
        &format!(
            r#"  - id: objects
    allowEncodedSlashes: true
    stages: [ {{ name: v1 }} ]
    routes:
      - {{ path: "/objects/{{key}}", method: GET, upstream: "http://{upstream}" }}
"#
        ),
    )
}

/// Every way of writing a path that a normalising upstream might resolve to a private resource (or
/// out of an upstream's base path): dot segments raw and encoded, encoded and doubly encoded
/// slashes, backslashes, empty segments, path parameters, case, NUL, the absolute form.
const ATTACKS: &[&str] = &[
    "/prod/items/..%2Fregistrations%2F1%2Fwarranty",
    "/prod/items/..%2fregistrations%2f1%2fwarranty",
    "/prod/items/%2e%2e%2fregistrations%2f1%2fwarranty",
    "/prod/items/%2E%2E/registrations/1/warranty",
    "/prod/items/..%2e/registrations/1/warranty",
    "/prod/items/..%252Fregistrations%252F1%252Fwarranty",
    "/prod/items/..%5Cregistrations%5C1%5Cwarranty",
    "/prod/items/..\\registrations\\1\\warranty",
    "/prod/items/1%00/../../registrations/1/warranty",
    "/prod/items/1;/../../registrations/1/warranty",
    "/prod/files/../registrations/1/warranty",
    "/prod/files/./../registrations/1/warranty",
    "/prod/files/a/../../registrations/1/warranty",
    "/prod/files/%2e%2e/registrations/1/warranty",
    "/prod/files/a/..%2F..%2Fregistrations/1/warranty",
    "/prod/files//../registrations/1/warranty",
    "/prod/files/..;/registrations/1/warranty",
    "/prod//registrations/1/warranty",
    "/prod///registrations//1//warranty",
    "/prod/registrations;x=1/1/warranty",
    "/prod/registrations/1;/warranty",
    "/prod/REGISTRATIONS/1/warranty",
    "/prod/Registrations/1/Warranty",
    "/prod/%72egistrations/1/warranty",
    "/prod/%2Fregistrations/1/warranty",
    "/prod/../prod/registrations/1/warranty",
    "/prod/files/../../prod/registrations/1/warranty",
    "/PROD/registrations/1/warranty",
    "/prod/admin/..%2F..%2Finternal%2Fsecret",
    "/prod/admin/../../internal/secret",
    "/prod/admin/x/../../../internal/secret",
    "/prod/admin/%2e%2e/%2e%2e/internal/secret",
    "/prod/admin/..%252F..%252Finternal",
    "/prod/admin/x/%2e%2e%2f%2e%2e%2finternal",
    "/prod/admin/..\\..\\internal\\secret",
    "/v1/objects/..%2F..%2Fprod%2Fregistrations%2F1%2Fwarranty",
    "/v1/objects/a%2F..%2F..%2Fregistrations",
    "/v1/objects/%2F%2F..",
    "http://127.0.0.1/prod/registrations/1/warranty",
    "//127.0.0.1/prod/registrations/1/warranty",
];

fn get(gw: &Gateway, target: &str, key: Option<&str>) -> String {
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    util::raw_exchange(
        gw.addr,
        format!("GET {target} HTTP/1.1\r\nHost: gw\r\n{key}Connection: close\r\n\r\n").as_bytes(),
    )
}

#[test]
fn the_upstream_only_ever_sees_admitted_paths() {
    // The upstream is of the kind the attacks aim at: on its own, it serves the private resource.
    let Some(control) = normalising_upstream() else {
        return;
    };
    for attack in [
        "/items/..%2Fregistrations%2F1%2Fwarranty",
        "/files/../registrations/1/warranty",
    ] {
        let direct = util::raw_exchange(
            control.addr,
            format!("GET {attack} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert!(
            direct.ends_with("/registrations/1/warranty"),
            "nginx does not normalise as expected: {direct}"
        );
    }
    drop(control);
    let Some(nginx) = normalising_upstream() else {
        return;
    };

    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &config(&nginx.addr.to_string()));
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);

    // Controls: the private route works with the key and not without it.
    assert_eq!(
        util::status_of(&get(&gw, "/prod/registrations/1/warranty", Some(KEY))),
        Some(200)
    );
    assert_eq!(
        util::status_of(&get(&gw, "/prod/registrations/1/warranty", None)),
        Some(403)
    );
    assert_eq!(util::status_of(&get(&gw, "/prod/items/1", None)), Some(200));
    // An API that allows encoded slashes gets them as they were sent.
    let kept = get(&gw, "/v1/objects/a%2Fb", None);
    assert_eq!(util::status_of(&kept), Some(200), "{kept}");

    let mut outcomes = Vec::new();
    for attack in ATTACKS {
        for key in [None, Some(KEY)] {
            let answer = get(&gw, attack, key);
            outcomes.push(format!(
                "{attack} key={} -> {:?}",
                key.is_some(),
                util::status_of(&answer)
            ));
            assert!(
                !(key.is_none() && answer.contains("/registrations/")),
                "{attack}: a private resource without a key: {answer}"
            );
            // nginx answers with the path it resolved.
            let resolved = answer.rsplit("\r\n\r\n").next().unwrap_or("");
            assert!(!resolved.starts_with("/internal"), "{attack}: {answer}");
        }
    }

    let seen = nginx.read("seen.log");
    let lines: Vec<(&str, &str, &str)> = seen
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '|');
            (f.next().unwrap(), f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    for (received, resolved, key) in &lines {
        let private = resolved.starts_with("/registrations") || resolved.starts_with("/admin");
        assert!(
            !private || *key == KEY,
            "the upstream served private {resolved} (sent {received}) without the key\n{}",
            outcomes.join("\n")
        );
        assert!(
            !resolved.starts_with("/internal"),
            "the upstream's base path was escaped: {received} -> {resolved}"
        );
        // What tollgate forwards is already normal: nothing is left for the upstream to resolve
        // but the decoding of escapes it kept.
        assert!(
            !received.contains("/../") && !received.contains("/./") && !received.contains("//"),
            "a path still to normalise reached the upstream: {received}"
        );
    }
    assert!(
        lines.iter().any(|(r, _, _)| *r == "/objects/a%2Fb"),
        "an allowed encoded slash is forwarded as it was sent: {seen}"
    );
    assert!(
        lines
            .iter()
            .any(|(r, _, k)| *r == "/registrations/1/warranty" && *k == KEY),
        "the control reached the upstream: {seen}"
    );
}

#[test]
fn refusals_say_why() {
    let Some(nginx) = normalising_upstream() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &config(&nginx.addr.to_string()));
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    for (target, message) in [
        (
            "/prod/items/a%2Fb",
            "Invalid request path: encoded slash (%2F or %5C)",
        ),
        (
            "/prod/items/..%2Fregistrations",
            "Invalid request path: dot segment between encoded slashes",
        ),
        (
            "/prod/items/%2e%2e",
            "Invalid request path: encoded dot (%2E)",
        ),
        (
            "/prod/items/a;b",
            "Invalid request path: ';' or '#' in the path",
        ),
        (
            "/prod/admin/../../x",
            "Invalid request path: '..' above the base path",
        ),
        (
            "/prod/items/%zz",
            "Invalid request path: invalid percent-encoding",
        ),
    ] {
        let answer = get(&gw, target, Some(KEY));
        assert_eq!(util::status_of(&answer), Some(400), "{target}: {answer}");
        assert!(
            answer.contains("x-amzn-errortype: BadRequestException"),
            "{answer}"
        );
        assert!(
            answer.ends_with(&format!("{{\"message\":\"{message}\"}}")),
            "{target}: {answer}"
        );
    }
    // Normalised, then routed and forwarded as normalised.
    let answer = get(&gw, "/prod/files/a/./b//c/../d", None);
    assert!(answer.ends_with("/files/a/b/d"), "{answer}");
}
