use std::process::Command;

use serde_json::{Value, json};

use crate::util::{
    self, ACCESS_KEY, AdminClient, Gateway, KEY, SECRET_KEY, assert_aws_error, cli, client,
};

const ADMIN_CONFIG: &str = "admin: { listen: 127.0.0.1:0 }\n";

async fn start(
    extra: &str,
    envs: &[(&str, &str)],
) -> (tempfile::TempDir, Gateway, AdminClient, util::Upstream) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(&format!("http://{}", up.addr), &format!("{ADMIN_CONFIG}{extra}"))
        .replace("      - { path: /health,", "      - { path: \"/pets/{id}\", method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:9\" }\n      - { path: /health,");
    util::write_config(dir.path(), &yaml);
    let mut env = util::admin_env();
    env.extend_from_slice(envs);
    let gw = Gateway::start(dir.path(), &env);
    let admin = AdminClient::new(gw.admin.expect("admin API address"));
    (dir, gw, admin, up)
}

#[tokio::test(flavor = "multi_thread")]
async fn signatures_are_verified() {
    let (_dir, gw, mut admin, _up) = start("", &[]).await;
    let url = format!("http://{}/apikeys", gw.admin.unwrap());

    let r = client().get(&url, None).await;
    assert_aws_error(
        &r,
        403,
        "MissingAuthenticationTokenException",
        "Missing Authentication Token",
    );
    // Health and metrics are open: load balancers and Prometheus do not sign.
    let health = client()
        .get(&format!("http://{}/health", gw.admin.unwrap()), None)
        .await;
    assert_eq!(
        (health.status, health.json()["status"].clone()),
        (200, json!("ok"))
    );
    let text = gw.metrics().await;
    assert!(text.contains("tollgate_build_info{"), "{text}");
    assert!(!text.contains(KEY), "no key values in metrics");

    admin.secret = "wrong".into();
    let r = admin.call("GET", "/apikeys", "").await;
    assert_aws_error(
        &r,
        403,
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
    );

    admin.secret = SECRET_KEY.into();
    admin.skew = -16 * 60;
    let r = admin.call("GET", "/apikeys", "").await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (403, Some("InvalidSignatureException"))
    );
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired: "),
        "{:?}",
        r.json()
    );
    admin.skew = 0;
    assert_eq!(admin.call("GET", "/apikeys", "").await.status, 200);

    // An access key nobody configured.
    let out = curl(&gw, "AKIDUNKNOWN", SECRET_KEY, &["/apikeys"]);
    assert!(out.contains("UnrecognizedClientException"), "{out}");
    // curl's own SigV4 signer: a body, then a query in the order curl sends it.
    let out = curl(
        &gw,
        ACCESS_KEY,
        SECRET_KEY,
        &[
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            r#"{"name":"from-curl","enabled":true}"#,
            "/apikeys",
        ],
    );
    assert!(out.contains(r#""name":"from-curl""#), "{out}");
    let out = curl(&gw, ACCESS_KEY, SECRET_KEY, &["/apikeys?name=from&limit=5"]);
    assert!(out.contains(r#""name":"from-curl""#), "{out}");
}

/// Runs curl with `--aws-sigv4` against the admin API; the last argument is the path.
fn curl(gw: &Gateway, access: &str, secret: &str, args: &[&str]) -> String {
    let (path, rest) = args.split_last().unwrap();
    let out = Command::new("curl")
        .args([
            "-s",
            "--aws-sigv4",
            "aws:amz:us-east-1:apigateway",
            "--user",
            &format!("{access}:{secret}"),
        ])
        .args(rest)
        .arg(format!("http://{}{path}", gw.admin.unwrap()))
        .output()
        .expect("curl is installed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_lifecycle() {
    let (_dir, _gw, admin, _up) = start("", &[]).await;
    let created = admin
        .ok(
            "POST",
            "/apikeys",
            r#"{"name":"partner-a","description":"A","customerId":"cust-1"}"#,
        )
        .await;
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 10);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    );
    assert_eq!(created["value"].as_str().unwrap().len(), 40);
    assert_eq!(created["enabled"], false, "AWS's default");
    assert_eq!(created["stageKeys"], json!([]));
    assert_eq!(created["tags"], json!({}));
    assert!(created["createdDate"].is_i64());
    assert_eq!(created["customerId"], "cust-1");

    let r = admin
        .call("POST", "/apikeys", r#"{"name":"x","value":"short"}"#)
        .await;
    assert_aws_error(
        &r,
        400,
        "BadRequestException",
        "API Key value should be at least 20 characters",
    );
    let long = format!(r#"{{"name":"x","value":"{}"}}"#, "v".repeat(129));
    let r = admin.call("POST", "/apikeys", &long).await;
    assert_aws_error(
        &r,
        400,
        "BadRequestException",
        "API Key value exceeds maximum size of 128 characters",
    );
    admin
        .ok(
            "POST",
            "/apikeys",
            r#"{"name":"given","value":"givenValue0123456789abc","enabled":true}"#,
        )
        .await;
    let r = admin
        .call(
            "POST",
            "/apikeys",
            r#"{"name":"dup","value":"givenValue0123456789abc"}"#,
        )
        .await;
    assert_aws_error(&r, 409, "ConflictException", "API Key already exists");
    let r = admin.call("POST", "/apikeys", "{not json").await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (400, Some("BadRequestException"))
    );

    let got = admin
        .ok("GET", &format!("/apikeys/{id}?includeValue=true"), "")
        .await;
    assert!(
        got.get("value").is_none(),
        "hashed storage cannot return values: {got}"
    );
    assert_eq!(got["name"], "partner-a");

    for name in ["partner-b", "partner-c", "other"] {
        admin
            .ok("POST", "/apikeys", &format!(r#"{{"name":"{name}"}}"#))
            .await;
    }
    let page1 = admin.ok("GET", "/apikeys?name=partner&limit=2", "").await;
    assert_eq!(page1["item"].as_array().unwrap().len(), 2);
    let position = page1["position"].as_str().unwrap();
    let page2 = admin
        .ok(
            "GET",
            &format!("/apikeys?name=partner&limit=2&position={position}"),
            "",
        )
        .await;
    assert_eq!(page2["item"].as_array().unwrap().len(), 1);
    assert!(page2.get("position").is_none());
    let names: Vec<&str> = page1["item"]
        .as_array()
        .unwrap()
        .iter()
        .chain(page2["item"].as_array().unwrap())
        .map(|k| k["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["partner-a", "partner-b", "partner-c"],
        "in creation order, whatever the ids"
    );
    let r = admin.call("GET", "/apikeys?position=nonsense", "").await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (400, Some("BadRequestException"))
    );
    // Plans too: created z then a, listed z then a, a page at a time.
    for name in ["zulu-plan", "alpha-plan"] {
        admin
            .ok("POST", "/usageplans", &format!(r#"{{"name":"{name}"}}"#))
            .await;
    }
    let first = admin.ok("GET", "/usageplans?limit=1", "").await;
    let position = first["position"].as_str().unwrap();
    let second = admin
        .ok(
            "GET",
            &format!("/usageplans?limit=5&position={position}"),
            "",
        )
        .await;
    let plans: Vec<&str> = first["item"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["item"].as_array().unwrap())
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let (z, a) = (
        plans.iter().position(|n| *n == "zulu-plan").unwrap(),
        plans.iter().position(|n| *n == "alpha-plan").unwrap(),
    );
    assert_eq!((z + 1, a + 1), (plans.len() - 1, plans.len()), "{plans:?}");
    assert_eq!(
        admin.ok("GET", "/apikeys?name=Partner", "").await["item"],
        json!([]),
        "prefix match is case-sensitive"
    );
    assert_eq!(
        admin.ok("GET", "/apikeys?customerId=cust-1", "").await["item"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let patch = json!({"patchOperations": [
        {"op": "replace", "path": "/enabled", "value": "true"},
        {"op": "replace", "path": "/name", "value": "partner-renamed"},
        {"op": "replace", "path": "/description", "value": "new"},
    ]});
    let updated = admin
        .ok("PATCH", &format!("/apikeys/{id}"), &patch.to_string())
        .await;
    assert_eq!(
        (
            updated["enabled"].clone(),
            updated["name"].clone(),
            updated["description"].clone()
        ),
        (json!(true), json!("partner-renamed"), json!("new"))
    );
    let r = admin
        .call(
            "PATCH",
            &format!("/apikeys/{id}"),
            r#"{"patchOperations":[{"op":"replace","path":"/id","value":"x"}]}"#,
        )
        .await;
    assert_aws_error(
        &r,
        400,
        "BadRequestException",
        "Invalid patch path  '/id' specified for op 'replace'. Must be one of: [/description, /enabled, /name, /customerId]",
    );

    let r = admin.call("DELETE", &format!("/apikeys/{id}"), "").await;
    assert_eq!(r.status, 202);
    for method in ["GET", "DELETE"] {
        let r = admin.call(method, &format!("/apikeys/{id}"), "").await;
        assert_aws_error(
            &r,
            404,
            "NotFoundException",
            "Invalid API Key identifier specified",
        );
    }
    let r = admin
        .call("PATCH", "/apikeys/nosuchkey0", &patch.to_string())
        .await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        "Invalid API Key identifier specified",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_plan_lifecycle() {
    let (_dir, _gw, admin, _up) = start("", &[]).await;
    let body = json!({
        "name": "gold", "description": "d",
        "apiStages": [{"apiId": "warranty", "stage": "prod", "throttle": {"/pets/{id}/GET": {"rateLimit": 0.5, "burstLimit": 2}}}],
        "throttle": {"rateLimit": 100, "burstLimit": 50},
        "quota": {"limit": 1000, "period": "MONTH", "offset": 2}
    });
    let plan = admin.ok("POST", "/usageplans", &body.to_string()).await;
    let id = plan["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 6);
    assert!(plan.get("tags").is_none(), "CreateUsagePlan omits tags");
    assert_eq!(
        plan["throttle"],
        json!({"rateLimit": 100.0, "burstLimit": 50})
    );
    assert_eq!(
        plan["quota"],
        json!({"limit": 1000, "offset": 2, "period": "MONTH"})
    );
    assert_eq!(
        plan["apiStages"][0]["throttle"]["/pets/{id}/GET"],
        json!({"rateLimit": 0.5, "burstLimit": 2})
    );
    let got = admin.ok("GET", &format!("/usageplans/{id}"), "").await;
    assert_eq!(got["tags"], json!({}));

    let cases = [
        (
            json!({"name": "x", "apiStages": [{"apiId": "warranty", "stage": "nope"}]}),
            404,
            "NotFoundException",
        ),
        (
            json!({"name": "x", "apiStages": [{"apiId": "warranty", "stage": "prod", "throttle": {"/pets/{id}/GET": {"rateLimit": 1, "burstLimit": 1}}}]}),
            400,
            "BadRequestException",
        ),
        (
            json!({"name": "x", "quota": {"limit": 5, "period": "MONTH", "offset": 28}}),
            400,
            "BadRequestException",
        ),
        (
            json!({"name": "x", "quota": {"limit": 5, "period": "YEAR"}}),
            400,
            "BadRequestException",
        ),
        (
            json!({"description": "no name"}),
            400,
            "BadRequestException",
        ),
    ];
    for (body, status, error_type) in cases {
        let r = admin.call("POST", "/usageplans", &body.to_string()).await;
        assert_eq!(
            (r.status, r.header("x-amzn-errortype")),
            (status, Some(error_type)),
            "{body}: {:?}",
            r.json()
        );
    }
    let r = admin.call("POST", "/usageplans", &json!({"name": "x", "apiStages": [{"apiId": "warranty", "stage": "prod", "throttle": {"/pets/{id}/GET": {"rateLimit": 1, "burstLimit": 1}}}]}).to_string()).await;
    assert_eq!(
        r.json()["message"],
        "Can not define fine grain throttling if usage plan throttle is not defined."
    );

    let patch = json!({"patchOperations": [
        {"op": "replace", "path": "/throttle/rateLimit", "value": "10"},
        {"op": "replace", "path": "/quota/limit", "value": "500"},
        {"op": "replace", "path": "/quota/period", "value": "WEEK"},
        {"op": "replace", "path": "/quota/offset", "value": "1"},
        {"op": "replace", "path": "/apiStages/warranty:prod/throttle/~1pets~1{id}/GET/rateLimit", "value": "0.1"},
        {"op": "replace", "path": "/name", "value": "gold-2"},
    ]});
    let updated = admin
        .ok("PATCH", &format!("/usageplans/{id}"), &patch.to_string())
        .await;
    assert_eq!(
        updated["throttle"],
        json!({"rateLimit": 10.0, "burstLimit": 50})
    );
    assert_eq!(
        updated["quota"],
        json!({"limit": 500, "offset": 1, "period": "WEEK"})
    );
    assert_eq!(
        updated["apiStages"][0]["throttle"]["/pets/{id}/GET"]["rateLimit"],
        0.1
    );
    assert_eq!(updated["name"], "gold-2");

    let r = admin
        .call(
            "PATCH",
            &format!("/usageplans/{id}"),
            r#"{"patchOperations":[{"op":"remove","path":"/apiStages"}]}"#,
        )
        .await;
    assert_aws_error(
        &r,
        400,
        "BadRequestException",
        "Invalid API Stage specified",
    );
    let r = admin
        .call(
            "PATCH",
            &format!("/usageplans/{id}"),
            r#"{"patchOperations":[{"op":"add","path":"/apiStages","value":"warranty:staging"}]}"#,
        )
        .await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        &format!(
            "Invalid API Stage {{api: warranty, stage: staging}} specified for usageplan {id}"
        ),
    );
    let r = admin
        .call("PATCH", "/usageplans/nope00", r#"{"patchOperations":[]}"#)
        .await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        "Invalid Usage Plan ID specified",
    );
    let r = admin.call("GET", "/usageplans/nope00", "").await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        "Invalid Usage Plan ID specified",
    );
    let removed = admin.ok("PATCH", &format!("/usageplans/{id}"), r#"{"patchOperations":[{"op":"remove","path":"/apiStages/warranty:prod/throttle"},{"op":"remove","path":"/quota"}]}"#).await;
    assert_eq!(removed["apiStages"][0].get("throttle"), None);
    assert!(removed.get("quota").is_none());

    // Plan keys.
    let key = admin
        .ok("POST", "/apikeys", r#"{"name":"member","enabled":true}"#)
        .await;
    let key_id = key["id"].as_str().unwrap();
    let pk = admin
        .ok(
            "POST",
            &format!("/usageplans/{id}/keys"),
            &json!({"keyId": key_id, "keyType": "API_KEY"}).to_string(),
        )
        .await;
    assert_eq!(
        pk,
        json!({"id": key_id, "type": "API_KEY", "name": "member"})
    );
    let r = admin
        .call(
            "POST",
            &format!("/usageplans/{id}/keys"),
            r#"{"keyId":"nosuchkey0","keyType":"API_KEY"}"#,
        )
        .await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        "Invalid API Key identifier specified",
    );
    let other_id = admin.create_prod_plan("silver").await;
    let r = admin
        .call(
            "POST",
            &format!("/usageplans/{other_id}/keys"),
            &json!({"keyId": key_id, "keyType": "API_KEY"}).to_string(),
        )
        .await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (409, Some("ConflictException"))
    );
    assert_eq!(
        admin
            .ok("GET", &format!("/usageplans/{id}/keys?name=mem"), "")
            .await["item"][0]["id"],
        key_id
    );
    assert_eq!(
        admin
            .ok("GET", &format!("/usageplans/{id}/keys/{key_id}"), "")
            .await["name"],
        "member"
    );
    assert_eq!(
        admin.ok("GET", "/usageplans/nope00/keys", "").await,
        json!({"item": []})
    );
    let with_key = admin
        .ok("GET", &format!("/usageplans?keyId={key_id}"), "")
        .await;
    assert_eq!(with_key["item"].as_array().unwrap().len(), 1);
    assert_eq!(with_key["item"][0]["id"], id.as_str());
    assert_eq!(
        admin
            .call("DELETE", &format!("/usageplans/{id}/keys/{key_id}"), "")
            .await
            .status,
        202
    );
    assert_eq!(
        admin.ok("GET", &format!("/usageplans/{id}/keys"), "").await["item"],
        json!([])
    );
    assert_eq!(
        admin
            .call("DELETE", &format!("/usageplans/{id}"), "")
            .await
            .status,
        202
    );
    let r = admin.call("DELETE", &format!("/usageplans/{id}"), "").await;
    assert_aws_error(
        &r,
        404,
        "NotFoundException",
        "Invalid Usage Plan ID specified",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_apply_to_the_very_next_request_and_usage_is_real_time() {
    let (_dir, gw, admin, _up) = start("", &[]).await;
    let c = client();
    let url = gw.url("/prod/echo/live");
    let plan = admin
        .ok("POST", "/usageplans", r#"{"name":"live","apiStages":[{"apiId":"warranty","stage":"prod"}],"throttle":{"rateLimit":0.01,"burstLimit":3},"quota":{"limit":5,"period":"DAY"}}"#)
        .await;
    let plan_id = plan["id"].as_str().unwrap();
    let key = admin
        .ok(
            "POST",
            "/apikeys",
            r#"{"name":"live-key","enabled":true,"value":"liveKeyValue0123456789abc"}"#,
        )
        .await;
    let key_id = key["id"].as_str().unwrap();
    let value = "liveKeyValue0123456789abc";
    assert_eq!(
        c.get(&url, Some(value)).await.status,
        403,
        "not in a plan yet"
    );
    admin
        .ok(
            "POST",
            &format!("/usageplans/{plan_id}/keys"),
            &json!({"keyId": key_id, "keyType": "API_KEY"}).to_string(),
        )
        .await;
    for _ in 0..3 {
        assert_eq!(c.get(&url, Some(value)).await.status, 200);
    }
    assert_eq!(
        c.get(&url, Some(value)).await.status,
        429,
        "burst of 3 spent"
    );

    // A raised throttle applies at once; the bucket level carries over and refills faster now.
    admin
        .ok(
            "PATCH",
            &format!("/usageplans/{plan_id}"),
            r#"{"patchOperations":[{"op":"replace","path":"/throttle/rateLimit","value":"1000"}]}"#,
        )
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    let r = c.get(&url, Some(value)).await;
    assert_eq!(r.status, 200);
    assert_eq!(util::quota_remaining(&r), 0);
    let r = c.get(&url, Some(value)).await;
    assert_eq!(r.json()["message"], "Limit Exceeded");

    // GetUsage counts every admitted call, right away.
    let today = util::today();
    let usage = admin.usage_today(plan_id).await;
    assert_eq!(usage["values"][key_id], json!([[5, 0]]));
    assert_eq!(usage["usagePlanId"], plan_id);

    // UpdateUsage: two more for today, effective on the next request.
    let patched = admin
        .ok(
            "PATCH",
            &format!("/usageplans/{plan_id}/keys/{key_id}/usage"),
            r#"{"patchOperations":[{"op":"replace","path":"/remaining","value":"2"}]}"#,
        )
        .await;
    assert_eq!(
        patched["values"][key_id]
            .as_array()
            .unwrap()
            .last()
            .unwrap(),
        &json!([5, 2])
    );
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    assert_eq!(c.get(&url, Some(value)).await.status, 429);
    let usage = admin
        .ok(
            "GET",
            &format!(
                "/usageplans/{plan_id}/usage?startDate={today}&endDate={today}&keyId={key_id}"
            ),
            "",
        )
        .await;
    assert_eq!(usage["values"][key_id], json!([[7, 0]]));
    let r = admin
        .call(
            "GET",
            &format!("/usageplans/{plan_id}/usage?startDate=yesterday&endDate={today}"),
            "",
        )
        .await;
    assert_eq!(r.status, 400);
    let r = admin
        .call(
            "GET",
            &format!("/usageplans/{plan_id}/usage?startDate=1970-01-01&endDate={today}"),
            "",
        )
        .await;
    assert_aws_error(
        &r,
        400,
        "BadRequestException",
        "A usage report covers at most 366 days",
    );

    // Disabled, then deleted: refused at once.
    admin
        .ok(
            "PATCH",
            &format!("/apikeys/{key_id}"),
            r#"{"patchOperations":[{"op":"replace","path":"/enabled","value":"false"}]}"#,
        )
        .await;
    assert_eq!(c.get(&url, Some(value)).await.status, 403);
    admin
        .ok(
            "PATCH",
            &format!("/usageplans/{plan_id}/keys/{key_id}/usage"),
            r#"{"patchOperations":[{"op":"replace","path":"/remaining","value":"100"}]}"#,
        )
        .await;
    admin
        .ok(
            "PATCH",
            &format!("/apikeys/{key_id}"),
            r#"{"patchOperations":[{"op":"replace","path":"/enabled","value":"true"}]}"#,
        )
        .await;
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    assert_eq!(
        admin
            .call("DELETE", &format!("/apikeys/{key_id}"), "")
            .await
            .status,
        202
    );
    assert_eq!(c.get(&url, Some(value)).await.status, 403);
    assert_eq!(
        admin
            .ok("GET", &format!("/usageplans/{plan_id}/keys"), "")
            .await["item"],
        json!([])
    );
}

/// A write whose caller hangs up while the store is busy is still finished, and served: the key it
/// added to a plan is let through by the data plane.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_is_finished_and_served_after_its_caller_hangs_up() {
    let (dir, gw, admin, _up) = start("", &[]).await;
    let plan_id = admin.create_prod_plan("late").await;
    let value = "lateKeyValue0123456789abcd";
    let key = admin
        .ok(
            "POST",
            "/apikeys",
            &json!({"name": "late", "enabled": true, "value": value}).to_string(),
        )
        .await;
    // Another writer holds the database, so the binding waits in the store (busy timeout 5 s)
    // while its caller gives up.
    let db = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let bind = json!({"keyId": key["id"], "keyType": "API_KEY"}).to_string();
    let path = format!("/usageplans/{plan_id}/keys");
    let gave_up = tokio::time::timeout(
        std::time::Duration::from_millis(700),
        admin.call("POST", &path, &bind),
    )
    .await;
    assert!(gave_up.is_err(), "answered while the database was held");
    db.execute_batch("COMMIT").unwrap();

    let url = gw.url("/prod/echo/late");
    let started = std::time::Instant::now();
    while client().get(&url, Some(value)).await.status != 200 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the write was not served"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn csv_import_as_aws_documents_it() {
    let (_dir, gw, admin, _up) = start("", &[]).await;
    let plan_id = &admin.create_prod_plan("imported").await;
    let other = admin.ok("POST", "/usageplans", r#"{"name":"other"}"#).await;
    let other_id = other["id"].as_str().unwrap();

    let csv = format!(
        "Name,key,description,Enabled,usageplanIds\nMyFirstApiKey,apikey1234abcdefghij0123456789,An imported key,TRUE,{plan_id}\n"
    );
    let r = admin
        .call(
            "POST",
            "/apikeys?mode=import&format=csv&failonwarnings=false",
            &csv,
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json());
    let out = r.json();
    assert_eq!(out["ids"].as_array().unwrap().len(), 1);
    assert_eq!(out["warnings"], json!([]));
    let id = out["ids"][0].as_str().unwrap().to_string();
    assert_eq!(
        client()
            .get(
                &gw.url("/prod/echo/csv"),
                Some("apikey1234abcdefghij0123456789")
            )
            .await
            .status,
        200
    );

    // Any column order, quoted plan lists, case-insensitive booleans; re-importing a value overwrites.
    let csv = format!(
        "Enabled,Name,key,UsageplanIds\ntRuE,Renamed,apikey1234abcdefghij0123456789,\"{plan_id},{other_id}\"\nfalse,Second, apikey1234abcdefghij0123456780 ,'{other_id}'\n"
    );
    let out = admin
        .ok("POST", "/apikeys?mode=import&format=csv", &csv)
        .await;
    assert_eq!(out["ids"][0], id.as_str(), "same value, same key");
    assert_eq!(
        admin.ok("GET", &format!("/apikeys/{id}"), "").await["name"],
        "Renamed"
    );
    assert_eq!(
        admin
            .ok("GET", &format!("/usageplans?keyId={id}"), "")
            .await["item"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let second = out["ids"][1].as_str().unwrap();
    assert_eq!(
        admin.ok("GET", &format!("/apikeys/{second}"), "").await["enabled"],
        false
    );

    // Bad rows: skipped with warnings, or the whole import refused with failonwarnings.
    let csv = "key,name\nshort,TooShort\nvalidImportValue0123456789,Fine\n";
    let out = admin
        .ok("POST", "/apikeys?mode=import&format=csv", csv)
        .await;
    assert_eq!(out["ids"].as_array().unwrap().len(), 1);
    assert_eq!(
        out["warnings"],
        json!(["Line 2: API Key value should be at least 20 characters"])
    );
    let csv = "key,name,usageplanids\nanotherImportValue0123456789,Bad,nope00\n";
    let r = admin
        .call(
            "POST",
            "/apikeys?mode=import&format=csv&failonwarnings=true",
            csv,
        )
        .await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (400, Some("BadRequestException"))
    );
    assert_eq!(
        admin.ok("GET", "/apikeys?name=Bad", "").await["item"],
        json!([]),
        "nothing imported"
    );
    let r = admin
        .call(
            "POST",
            "/apikeys?mode=import&format=csv",
            "name,description\nx,y\n",
        )
        .await;
    assert_eq!(r.status, 400, "Key column is required");
}

#[tokio::test(flavor = "multi_thread")]
async fn encrypted_values_are_returned_like_aws() {
    let key_hex = "8f1c2b3a4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
    let (dir, gw, admin, _up) = start(
        "keyValueStorage: encrypted\n",
        &[("TOLLGATE_KEY_ENCRYPTION_KEY", key_hex)],
    )
    .await;
    let created = admin
        .ok("POST", "/apikeys", r#"{"name":"sealed","enabled":true}"#)
        .await;
    let id = created["id"].as_str().unwrap();
    let value = created["value"].as_str().unwrap();
    let got = admin
        .ok("GET", &format!("/apikeys/{id}?includeValue=true"), "")
        .await;
    assert_eq!(got["value"], value);
    assert!(
        admin
            .ok("GET", &format!("/apikeys/{id}"), "")
            .await
            .get("value")
            .is_none()
    );
    let listed = admin
        .ok("GET", "/apikeys?includeValues=true&name=sealed", "")
        .await;
    assert_eq!(listed["item"][0]["value"], value);
    let plan = admin.ok("POST", "/usageplans", r#"{"name":"p"}"#).await;
    let pk = admin
        .ok(
            "POST",
            &format!("/usageplans/{}/keys", plan["id"].as_str().unwrap()),
            &json!({"keyId": id, "keyType": "API_KEY"}).to_string(),
        )
        .await;
    assert_eq!(pk["value"], value);
    drop(gw);
    // The database holds no plaintext value.
    let db = std::fs::read(dir.path().join("tollgate.db")).unwrap();
    let wal = std::fs::read(dir.path().join("tollgate.db-wal")).unwrap_or_default();
    assert!(!db.windows(value.len()).any(|w| w == value.as_bytes()));
    assert!(!wal.windows(value.len()).any(|w| w == value.as_bytes()));
}

#[test]
fn admin_on_a_public_address_needs_credentials() {
    let dir = tempfile::tempdir().unwrap();
    util::write_config(
        dir.path(),
        &util::config("http://127.0.0.1:9", "admin: { listen: 0.0.0.0:0 }\n"),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config", "tollgate.yaml"])
        .current_dir(dir.path())
        .env_remove("TOLLGATE_ADMIN_ACCESS_KEY_ID")
        .env_remove("TOLLGATE_ADMIN_SECRET_ACCESS_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("admin.listen: the admin API may listen on 0.0.0.0 only with credentials"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_the_whole_lifecycle() {
    let (dir, gw, _admin, _up) = start("", &[]).await;
    let json = |args: &[&str]| -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&cli(&gw, &all)).unwrap()
    };
    let key = json(&[
        "keys",
        "create",
        "--name",
        "cli-key",
        "--value",
        "cliKeyValue0123456789abcd",
    ]);
    let key_id = key["id"].as_str().unwrap().to_string();
    assert_eq!(key["enabled"], true);
    let plan = json(&[
        "plans",
        "create",
        "--name",
        "cli-plan",
        "--api-stage",
        "warranty:prod",
        "--rate-limit",
        "50",
        "--burst-limit",
        "10",
        "--quota-limit",
        "100",
        "--quota-period",
        "DAY",
        "--method-throttle",
        "warranty:prod/registrations/{id}/warranty/PUT=1,1",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_string();
    assert_eq!(
        plan["apiStages"][0]["throttle"]["/registrations/{id}/warranty/PUT"]["burstLimit"],
        1
    );
    let table = cli(&gw, &["plans", "add-key", &plan_id, &key_id]);
    assert!(
        table.contains("API_KEY") && table.contains("cli-key"),
        "{table}"
    );

    let c = client();
    let put = gw.url("/prod/registrations/9/warranty");
    assert_eq!(c.put(&put, "cliKeyValue0123456789abcd").await.status, 200);
    assert_eq!(
        c.put(&put, "cliKeyValue0123456789abcd").await.status,
        429,
        "the method throttle (burst 1)"
    );

    let today = util::today();
    let usage = json(&[
        "usage", "--plan", &plan_id, "--from", &today, "--to", &today,
    ]);
    assert_eq!(usage["values"][&key_id], json!([[1, 99]]));
    let usage = json(&[
        "usage",
        "set-remaining",
        "--plan",
        &plan_id,
        "--key",
        &key_id,
        "--remaining",
        "7",
    ]);
    assert_eq!(
        usage["values"][&key_id].as_array().unwrap().last().unwrap(),
        &json!([1, 7])
    );

    let updated = json(&[
        "plans",
        "update",
        &plan_id,
        "--rate-limit",
        "5",
        "--quota-limit",
        "200",
    ]);
    assert_eq!(updated["throttle"]["rateLimit"], 5.0);
    assert_eq!(updated["quota"]["limit"], 200);
    let listed = json(&["plans", "list", "--key-id", &key_id]);
    assert_eq!(listed["item"].as_array().unwrap().len(), 1);
    let keys = json(&["keys", "list", "--name", "cli"]);
    assert_eq!(keys["item"][0]["id"], key_id.as_str());
    assert_eq!(
        json(&["keys", "update", &key_id, "--enabled", "false"])["enabled"],
        false
    );
    assert_eq!(c.put(&put, "cliKeyValue0123456789abcd").await.status, 403);

    std::fs::write(
        dir.path().join("keys.csv"),
        format!("name,key,usageplanids\ncsv-key,csvKeyValue0123456789abcd,{plan_id}\n"),
    )
    .unwrap();
    let out = cli(
        &gw,
        &[
            "keys",
            "import",
            dir.path().join("keys.csv").to_str().unwrap(),
        ],
    );
    assert!(out.starts_with("imported "), "{out}");
    assert!(cli(&gw, &["plans", "keys", &plan_id]).contains("csv-key"));

    assert!(cli(&gw, &["plans", "remove-key", &plan_id, &key_id]).contains("removed"));
    assert!(cli(&gw, &["keys", "delete", &key_id]).contains("deleted"));
    assert!(cli(&gw, &["plans", "delete", &plan_id]).contains("deleted"));

    // Errors come back with AWS's type and message and a failing exit status.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "get", "nosuchkey0"])
        .env("TOLLGATE_ENDPOINT", format!("http://{}", gw.admin.unwrap()))
        .env("TOLLGATE_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
        .env("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("NotFoundException: Invalid API Key identifier specified")
    );
}

/// `aws apigateway …` against a gateway's admin API, signed with the test credentials; its tests
/// are skipped where the AWS CLI is not installed (see [`util::have`]).
struct AwsCli {
    endpoint: String,
}

impl AwsCli {
    /// The AWS CLI, or `None` (the test is skipped) when it is not installed and not required.
    fn for_gateway(gw: &Gateway) -> Option<AwsCli> {
        if !util::have("aws", &["--version"], "pip install awscli") {
            return None;
        }
        Some(AwsCli {
            endpoint: format!("http://{}", gw.admin.unwrap()),
        })
    }

    /// The answer as JSON, or what the CLI printed on stderr.
    fn run(&self, args: &[&str]) -> Result<Value, String> {
        let out = Command::new("aws")
            .args(["--endpoint-url", &self.endpoint, "--output", "json"])
            .arg("apigateway")
            .args(args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_DEFAULT_REGION", "eu-west-1")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    /// The answer of a call that must succeed.
    fn ok(&self, args: &[&str]) -> Value {
        self.run(args)
            .unwrap_or_else(|e| panic!("aws {args:?}: {e}"))
    }

    /// CreateUsagePlanKey: the key `key_id` into the plan `plan_id`.
    fn add_to_plan(&self, plan_id: &str, key_id: &str) {
        self.ok(&[
            "create-usage-plan-key",
            "--usage-plan-id",
            plan_id,
            "--key-id",
            key_id,
            "--key-type",
            "API_KEY",
        ]);
    }

    /// The error of a call that must fail.
    fn fails(&self, args: &[&str]) -> String {
        self.run(args)
            .err()
            .unwrap_or_else(|| panic!("aws {args:?} succeeded"))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_aws_cli_imports_100k_keys_in_one_call() {
    let (dir, gw, admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let plan_id = admin.create_prod_plan("bulk").await;
    // 6.8 MB, sent as the AWS CLI sends it: the payload's hash unsigned.
    let value = |i: u32| format!("bulkImportedKeyValue{i:08}abcdefgh");
    let mut csv = String::from("Name,key,Enabled,usageplanIds\n");
    for i in 0..100_000 {
        csv.push_str(&format!("bulk-{i:06},{},TRUE,{plan_id}\n", value(i)));
    }
    assert!(csv.len() > 6_000_000, "{}", csv.len());
    let file = dir.path().join("keys.csv");
    std::fs::write(&file, &csv).unwrap();
    let body = format!("fileb://{}", file.display());
    let out = cli.ok(&["import-api-keys", "--format", "csv", "--body", &body]);
    assert_eq!(out["ids"].as_array().unwrap().len(), 100_000);
    assert_eq!(out["warnings"], json!([]));
    for i in [0, 54_321, 99_999] {
        let r = client()
            .get(&gw.url("/prod/echo/bulk"), Some(&value(i)))
            .await;
        assert_eq!(r.status, 200);
    }
    // Over AWS's 10 MB: refused as AWS refuses it, before it is all held.
    let big = dir.path().join("big.csv");
    std::fs::write(&big, csv.repeat(2)).unwrap();
    let body = format!("fileb://{}", big.display());
    let said = cli.fails(&["import-api-keys", "--format", "csv", "--body", &body]);
    assert!(said.contains("RequestTooLongException"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_aws_cli_works_unchanged() {
    let (_dir, gw, _admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let aws = |args: &[&str]| cli.ok(args);
    let key = aws(&[
        "create-api-key",
        "--name",
        "cli",
        "--enabled",
        "--value",
        "awsCliKeyValue0123456789",
    ]);
    let key_id = key["id"].as_str().unwrap().to_string();
    let plan = aws(&[
        "create-usage-plan",
        "--name",
        "aws-plan",
        "--api-stages",
        "apiId=warranty,stage=prod",
        "--throttle",
        "burstLimit=5,rateLimit=10",
        "--quota",
        "limit=100,period=DAY",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_string();
    assert_eq!(plan["throttle"]["rateLimit"], 10.0);
    aws(&[
        "create-usage-plan-key",
        "--usage-plan-id",
        &plan_id,
        "--key-id",
        &key_id,
        "--key-type",
        "API_KEY",
    ]);
    assert_eq!(
        client()
            .get(&gw.url("/prod/echo/aws"), Some("awsCliKeyValue0123456789"))
            .await
            .status,
        200
    );
    let today = util::today();
    let usage = aws(&[
        "get-usage",
        "--usage-plan-id",
        &plan_id,
        "--start-date",
        &today,
        "--end-date",
        &today,
    ]);
    // The CLI renames the wire's `values` to `items`, as it does against AWS.
    assert_eq!(usage["items"][&key_id], json!([[1, 99]]));
    let usage = aws(&[
        "update-usage",
        "--usage-plan-id",
        &plan_id,
        "--key-id",
        &key_id,
        "--patch-operations",
        "op=replace,path=/remaining,value=50",
    ]);
    assert_eq!(
        usage["items"][&key_id].as_array().unwrap().last().unwrap(),
        &json!([1, 50])
    );
    let keys = aws(&["get-api-keys", "--name-query", "cl"]);
    assert_eq!(keys["items"][0]["id"], key_id.as_str());
    aws(&[
        "update-api-key",
        "--api-key",
        &key_id,
        "--patch-operations",
        "op=replace,path=/enabled,value=false",
    ]);
    assert_eq!(
        client()
            .get(&gw.url("/prod/echo/aws"), Some("awsCliKeyValue0123456789"))
            .await
            .status,
        403
    );
    aws(&[
        "delete-usage-plan-key",
        "--usage-plan-id",
        &plan_id,
        "--key-id",
        &key_id,
    ]);
    aws(&["delete-api-key", "--api-key", &key_id]);
    aws(&["delete-usage-plan", "--usage-plan-id", &plan_id]);
    let err = cli.fails(&["get-api-key", "--api-key", &key_id]);
    assert!(err.contains("(NotFoundException) when calling the GetApiKey operation: Invalid API Key identifier specified"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_ip_allowlist_set_through_the_aws_cli_survives_a_restart() {
    let (dir, gw, _admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let value = "allowlistedKeyValue0123456789";
    let key = cli.ok(&[
        "create-api-key",
        "--name",
        "partner",
        "--enabled",
        "--value",
        value,
    ]);
    let key_id = key["id"].as_str().unwrap().to_string();
    let plan = cli.ok(&[
        "create-usage-plan",
        "--name",
        "partners",
        "--api-stages",
        "apiId=warranty,stage=prod",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_string();
    cli.add_to_plan(&plan_id, &key_id);
    let key_arn = format!("arn:aws:apigateway:eu-west-1::/apikeys/{key_id}");
    let tag = |list: &str| format!(r#"{{"tollgate:allowedSourceIps": "{list}"}}"#);
    let c = client();
    let url = gw.url("/prod/echo/allowlist");
    assert_eq!(c.get(&url, Some(value)).await.status, 200);

    // A malformed list is refused with AWS's error shape, naming the tag and the CIDR.
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        &tag("127.0.0.0/8,10.0.0.0/33"),
    ]);
    assert!(
        err.contains("(BadRequestException)")
            && err.contains("tollgate:allowedSourceIps")
            && err.contains("'10.0.0.0/33' is not a CIDR"),
        "{err}"
    );
    assert_eq!(
        c.get(&url, Some(value)).await.status,
        200,
        "nothing was kept"
    );

    // Loopback, IPv4 and IPv6: let through. Elsewhere only: 403, before any limit.
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        &tag("127.0.0.0/8, ::1"),
    ]);
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        &tag("203.0.113.0/24,2001:db8::/32"),
    ]);
    let r = c.get(&url, Some(value)).await;
    assert_eq!((r.status, r.json()), (403, json!({"message": "Forbidden"})));
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"decision="ip_forbidden"} 1"#),
        "{metrics}"
    );
    let key = cli.ok(&["get-api-key", "--api-key", &key_id]);
    assert_eq!(
        key["tags"]["tollgate:allowedSourceIps"],
        "203.0.113.0/24,2001:db8::/32"
    );

    // Across a restart.
    assert!(gw.terminate().success());
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let url = gw.url("/prod/echo/allowlist");
    assert_eq!(c.get(&url, Some(value)).await.status, 403);
    let cli = AwsCli::for_gateway(&gw).unwrap();
    cli.ok(&[
        "untag-resource",
        "--resource-arn",
        &key_arn,
        "--tag-keys",
        "tollgate:allowedSourceIps",
    ]);
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_shared_by_customer_switched_through_the_aws_cli_survive_a_restart() {
    let (dir, gw, _admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let values = [
        "acmeProdKeyValue0123456789",
        "acmeStagingKeyValue0123456789",
    ];
    let ids: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, value)| {
            let name = format!("acme-{i}");
            let key = cli.ok(&[
                "create-api-key",
                "--name",
                &name,
                "--enabled",
                "--value",
                value,
                "--customer-id",
                "acme",
            ]);
            key["id"].as_str().unwrap().to_string()
        })
        .collect();
    let plan = cli.ok(&[
        "create-usage-plan",
        "--name",
        "acme",
        "--api-stages",
        "apiId=warranty,stage=prod",
        "--quota",
        "limit=4,period=DAY",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_string();
    for id in &ids {
        cli.add_to_plan(&plan_id, id);
    }
    let plan_arn = format!("arn:aws:apigateway:eu-west-1::/usageplans/{plan_id}");
    let c = client();
    let url = gw.url("/prod/echo/shared");
    let left = |r: util::Reply| {
        (
            r.status,
            (r.status == 200).then(|| util::quota_remaining(&r)),
        )
    };
    // Each key its own quota at first.
    assert_eq!(left(c.get(&url, Some(values[0])).await), (200, Some(3)));
    assert_eq!(left(c.get(&url, Some(values[1])).await), (200, Some(3)));

    // An unknown way to share is refused, naming the tag and the choice.
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &plan_arn,
        "--tags",
        "tollgate:limitsShareBy=customerID",
    ]);
    assert!(
        err.contains("(BadRequestException)")
            && err.contains("tollgate:limitsShareBy")
            && err.contains("\"customerId\""),
        "{err}"
    );
    // Shared from now on: one quota for the customer, counted from here.
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &plan_arn,
        "--tags",
        "tollgate:limitsShareBy=customerId",
    ]);
    assert_eq!(left(c.get(&url, Some(values[0])).await), (200, Some(3)));
    assert_eq!(left(c.get(&url, Some(values[1])).await), (200, Some(2)));
    assert_eq!(left(c.get(&url, Some(values[0])).await), (200, Some(1)));
    // GetUsage: each key's own use today, and what the customer has left.
    let today = util::today();
    let usage = cli.ok(&[
        "get-usage",
        "--usage-plan-id",
        &plan_id,
        "--start-date",
        &today,
        "--end-date",
        &today,
    ]);
    assert_eq!(
        usage["items"],
        json!({ &ids[0]: [[3, 1]], &ids[1]: [[2, 1]] }),
        "{usage}"
    );

    // Across a restart, the customer's count holds.
    assert!(gw.terminate().success());
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let url = gw.url("/prod/echo/shared");
    assert_eq!(left(c.get(&url, Some(values[1])).await), (200, Some(0)));
    assert_eq!(left(c.get(&url, Some(values[0])).await), (429, None));
    let cli = AwsCli::for_gateway(&gw).unwrap();
    // A key moved to another customer draws on that customer's limits: nothing spent yet.
    let set_customer = |cli: &AwsCli, customer: &str| {
        let op = format!("op=replace,path=/customerId,value={customer}");
        cli.ok(&[
            "update-api-key",
            "--api-key",
            &ids[1],
            "--patch-operations",
            &op,
        ]);
    };
    set_customer(&cli, "other");
    assert_eq!(left(c.get(&url, Some(values[1])).await), (200, Some(3)));
    // Without a customer, its own quota again: all it used today counts.
    set_customer(&cli, "");
    assert_eq!(
        left(c.get(&url, Some(values[1])).await),
        (429, None),
        "it used 4"
    );
    // Not shared any more: each key's own count, from what it used today.
    cli.ok(&[
        "untag-resource",
        "--resource-arn",
        &plan_arn,
        "--tag-keys",
        "tollgate:limitsShareBy",
    ]);
    assert_eq!(
        left(c.get(&url, Some(values[0])).await),
        (200, Some(0)),
        "4 - 3 used - this one"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_and_a_credit_refill_switched_through_the_aws_cli() {
    let (_dir, gw, _admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let value = "shadowTriedKeyValue0123456789";
    let key = cli.ok(&[
        "create-api-key",
        "--name",
        "tried",
        "--enabled",
        "--value",
        value,
    ]);
    let key_id = key["id"].as_str().unwrap().to_string();
    // A malformed value is refused, naming the tag and the choices.
    let err = cli.fails(&[
        "create-usage-plan",
        "--name",
        "tried",
        "--api-stages",
        "apiId=warranty,stage=prod",
        "--quota",
        "limit=1,period=DAY",
        "--tags",
        "tollgate:enforcement=dry-run",
    ]);
    assert!(
        err.contains("(BadRequestException)") && err.contains("tollgate:enforcement"),
        "{err}"
    );
    let plan = cli.ok(&[
        "create-usage-plan",
        "--name",
        "tried",
        "--api-stages",
        "apiId=warranty,stage=prod",
        "--quota",
        "limit=1,period=DAY",
        "--tags",
        "tollgate:enforcement=shadow",
    ]);
    let plan_id = plan["id"].as_str().unwrap().to_string();
    cli.add_to_plan(&plan_id, &key_id);
    let c = client();
    let url = gw.url("/prod/echo/tried");
    for _ in 0..3 {
        assert_eq!(c.get(&url, Some(value)).await.status, 200, "in shadow");
    }
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"decision="shadow_quota_exceeded"} 2"#),
        "{metrics}"
    );
    // Enforced: clean, then refused.
    let plan_arn = format!("arn:aws:apigateway:eu-west-1::/usageplans/{plan_id}");
    cli.ok(&[
        "untag-resource",
        "--resource-arn",
        &plan_arn,
        "--tag-keys",
        "tollgate:enforcement",
    ]);
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    assert_eq!(c.get(&url, Some(value)).await.status, 429);

    // A credit refill set as a tag: the key holds credits, shown by GetApiKey.
    let key_arn = format!("arn:aws:apigateway:eu-west-1::/apikeys/{key_id}");
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        "tollgate:creditRefill=5/YEAR",
    ]);
    assert!(
        err.contains("tollgate:creditRefill") && err.contains("1000/MONTH"),
        "{err}"
    );
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        "tollgate:creditRefill=5/DAY",
    ]);
    let key = cli.ok(&["get-api-key", "--api-key", &key_id]);
    assert_eq!(key["tags"]["tollgate:creditRefill"], "5/DAY");
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_and_expiry_through_the_aws_cli_survive_a_restart() {
    let (dir, gw, _admin, _up) = start("", &[]).await;
    let Some(cli) = AwsCli::for_gateway(&gw) else {
        return;
    };
    let value = "taggedKeyValue0123456789";
    let key = cli.ok(&[
        "create-api-key",
        "--name",
        "tagged",
        "--enabled",
        "--value",
        value,
        "--tags",
        "team=partners,env=prod",
    ]);
    assert_eq!(key["tags"], json!({"team": "partners", "env": "prod"}));
    let key_id = key["id"].as_str().unwrap().to_string();
    let plan = cli.ok(&[
        "create-usage-plan",
        "--name",
        "tagged-plan",
        "--api-stages",
        "apiId=warranty,stage=prod",
        "--tags",
        "cost-centre=42",
    ]);
    assert_eq!(plan["tags"], json!({"cost-centre": "42"}));
    let plan_id = plan["id"].as_str().unwrap().to_string();
    cli.add_to_plan(&plan_id, &key_id);
    let key_arn = format!("arn:aws:apigateway:eu-west-1::/apikeys/{key_id}");
    let plan_arn = format!("arn:aws:apigateway:eu-west-1::/usageplans/{plan_id}");
    let c = client();
    let url = gw.url("/prod/echo/tags");
    assert_eq!(c.get(&url, Some(value)).await.status, 200);

    // An expiry in the past, set the way AWS's tools set tags: refused at once, as a disabled key is.
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        "owner=ops,tollgate:expiresAt=2020-01-01T00:00:00Z",
    ]);
    let r = c.get(&url, Some(value)).await;
    assert_eq!(
        (r.status, r.json()["message"].clone()),
        (403, json!("Forbidden"))
    );
    let key = cli.ok(&["get-api-key", "--api-key", &key_id]);
    assert_eq!(key["tags"]["owner"], "ops");
    let metrics = gw.metrics().await;
    assert!(metrics.contains(r#"decision="expired"} 1"#), "{metrics}");
    cli.ok(&[
        "untag-resource",
        "--resource-arn",
        &key_arn,
        "--tag-keys",
        "tollgate:expiresAt",
    ]);
    assert_eq!(c.get(&url, Some(value)).await.status, 200);
    let tags = cli.ok(&["get-tags", "--resource-arn", &key_arn]);
    assert_eq!(
        tags["tags"],
        json!({"team": "partners", "env": "prod", "owner": "ops"})
    );

    // AWS's limits and messages.
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        "aws:x=1",
    ]);
    assert!(
        err.contains("(BadRequestException)") && err.contains("Tag keys cannot start with 'aws:'"),
        "{err}"
    );
    let many: Vec<String> = (0..48).map(|i| format!("t{i}=v")).collect();
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        &many.join(","),
    ]);
    assert!(err.contains("at most 50"), "{err}");
    let err = cli.fails(&[
        "tag-resource",
        "--resource-arn",
        &key_arn,
        "--tags",
        "tollgate:expiresAt=soon",
    ]);
    assert!(err.contains("RFC 3339"), "{err}");
    let err = cli.fails(&[
        "get-tags",
        "--resource-arn",
        "arn:aws:apigateway:eu-west-1::/apikeys/nokey00000",
    ]);
    assert!(err.contains("(NotFoundException)"), "{err}");

    // Plans: tags, and productCode by add as well as replace.
    cli.ok(&[
        "tag-resource",
        "--resource-arn",
        &plan_arn,
        "--tags",
        "tier=gold",
    ]);
    let plan = cli.ok(&[
        "update-usage-plan",
        "--usage-plan-id",
        &plan_id,
        "--patch-operations",
        "op=add,path=/productCode,value=pc-1",
    ]);
    assert_eq!(plan["productCode"], "pc-1");
    // CreateUsagePlanKey with neither the key nor the plan: the key is checked first.
    let err = cli.fails(&[
        "create-usage-plan-key",
        "--usage-plan-id",
        "noplan",
        "--key-id",
        "nokey00000",
        "--key-type",
        "API_KEY",
    ]);
    assert!(
        err.contains("(NotFoundException)") && err.contains("Invalid API Key identifier specified"),
        "{err}"
    );

    // Across a restart.
    assert!(gw.terminate().success());
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let cli = AwsCli::for_gateway(&gw).unwrap();
    let tags = cli.ok(&["get-tags", "--resource-arn", &key_arn]);
    assert_eq!(
        tags["tags"],
        json!({"team": "partners", "env": "prod", "owner": "ops"})
    );
    let plan = cli.ok(&["get-usage-plan", "--usage-plan-id", &plan_id]);
    assert_eq!(plan["tags"], json!({"cost-centre": "42", "tier": "gold"}));
    assert_eq!(plan["productCode"], "pc-1");
    assert!(gw.terminate().success());
}

/// The samples of a text exposition (either format): `name{labels}` to value. Every line must be a
/// comment or a sample.
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
        assert!(
            out.insert(series.to_string(), value).is_none(),
            "{series} twice"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_have_their_names_and_labels_in_either_format() {
    let (_dir, gw, admin, _up) = start(util::ONE_PLAN, &[]).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(KEY)).await.status, 200);
    }
    assert_eq!(c.get(&gw.url("/prod/echo/a"), None).await.status, 403);
    let unknown = Some("no-such-key-0123456789abcdef");
    assert_eq!(c.get(&gw.url("/prod/echo/a"), unknown).await.status, 403);
    assert_eq!(c.get(&gw.url("/prod/nowhere"), Some(KEY)).await.status, 403);
    // A method of the client's choosing does not become a label of its own.
    let odd = c
        .send("FROB", &gw.url("/prod/echo/a"), &[("x-api-key", KEY)], "")
        .await;
    assert_eq!(odd.status, 200);
    // The two scrapes compared below must see the same series: the flusher's first write adds
    // some, so it is waited for.
    for _ in 0..200 {
        if gw.metrics().await.contains("operation=\"add_usage\"") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    // What Prometheus asks for.
    let metrics_url = format!("http://{}/metrics", gw.admin.unwrap());
    let accept = [("accept", PROMETHEUS_ACCEPT)];
    let r = c.send("GET", &metrics_url, &accept, "").await;
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE tollgate_request_duration_seconds histogram\n# UNIT tollgate_request_duration_seconds seconds\n"),
        "{open}"
    );
    assert!(
        open.contains("# TYPE tollgate_decisions counter\n"),
        "{open}"
    );
    // The classic format by default, with the same samples.
    let r = c.get(&metrics_url, None).await;
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = String::from_utf8(r.body.to_vec()).unwrap();
    assert!(
        !text.contains("# EOF") && !text.contains("# UNIT"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tollgate_decisions_total counter\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tollgate_build_info gauge\n"),
        "{text}"
    );
    let s = samples(&text);
    assert_eq!(
        samples(&open).keys().collect::<Vec<_>>(),
        s.keys().collect::<Vec<_>>()
    );
    if util::have(
        "promtool",
        &["--version"],
        "Debian: apt-get install prometheus",
    ) {
        let lint = promtool_check_metrics(&text);
        assert!(lint.is_empty(), "promtool check metrics: {lint}\n{text}");
    }
    let at = |series: &str| {
        *s.get(series)
            .unwrap_or_else(|| panic!("{series} missing: {text}"))
    };
    // Decisions per stage and usage plan (by id, as AWS's tools name plans).
    let plan = &admin.plan_id("p").await;
    let decided = |api_stage: &str, plan: &str, decision: &str| {
        at(&format!(
            r#"tollgate_decisions_total{{{api_stage},usage_plan="{plan}",decision="{decision}"}}"#
        ))
    };
    let prod = r#"api="warranty",stage="prod""#;
    assert_eq!(decided(prod, plan, "allowed"), 4.0);
    assert_eq!(decided(prod, "", "missing_key"), 1.0);
    assert_eq!(decided(prod, "", "invalid_key"), 1.0);
    assert_eq!(decided(r#"api="",stage="""#, "", "no_route"), 1.0);
    // Usage plans by name, to join on.
    assert_eq!(
        at(&format!(
            r#"tollgate_usage_plan_info{{id="{plan}",name="p"}}"#
        )),
        1.0
    );
    // Durations by route template, method, status, scheme and protocol (OpenTelemetry's names);
    // unmatched requests have no route.
    let route = r#"api="warranty",stage="prod",http_route="/echo/{rest+}""#;
    let how = |method: &str, status: u16| {
        format!(
            r#"http_request_method="{method}",http_response_status_code="{status}",url_scheme="http",network_protocol_version="1.1""#
        )
    };
    let count = |labels: &str| {
        at(&format!(
            "tollgate_request_duration_seconds_count{{{labels}}}"
        ))
    };
    assert_eq!(count(&format!("{route},{}", how("GET", 200))), 3.0);
    assert_eq!(count(&format!("{route},{}", how("GET", 403))), 2.0);
    assert_eq!(count(&format!("{route},{}", how("_OTHER", 200))), 1.0);
    let unmatched = r#"api="",stage="",http_route="""#;
    assert_eq!(count(&format!("{unmatched},{}", how("GET", 403))), 1.0);
    assert!(
        !text.contains("FROB") && !text.contains("/prod/echo/a"),
        "{text}"
    );
    let buckets = s
        .keys()
        .filter(|k| {
            k.starts_with("tollgate_request_duration_seconds_bucket{")
                && k.contains(&how("GET", 200))
        })
        .count();
    assert_eq!(buckets, 21, "20 bounds and +Inf");
    // The first bounds are under a millisecond, where a gateway's own answers fall.
    for le in ["0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025"] {
        assert!(
            s.keys().any(
                |k| k.starts_with("tollgate_request_duration_seconds_bucket{")
                    && k.contains(&format!("le=\"{le}\""))
            ),
            "{le}: {text}"
        );
    }
    assert_eq!(
        at(&format!(
            "tollgate_integration_duration_seconds_count{{{route}}}"
        )),
        4.0
    );
    assert_eq!(at("tollgate_requests_in_flight"), 0.0);
    // The client's pooled connection may still be open.
    assert!(
        (0.0..=5.0).contains(&at("tollgate_open_connections")),
        "{text}"
    );
    assert_eq!(at("tollgate_api_keys"), 1.0);
    assert_eq!(
        at(&format!(
            "tollgate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        1.0
    );
    for name in [
        "tollgate_connections_refused_total",
        "tollgate_tls_handshakes_failed_total",
        "tollgate_http2_rapid_reset_total",
        "tollgate_access_log_dropped_total",
        "tollgate_usage_plans",
    ] {
        assert!(s.contains_key(name), "{name} missing: {text}");
    }
    // Redis's state only in cluster mode; no key value or key id anywhere.
    assert!(!text.contains("tollgate_store_degraded"), "{text}");
    assert!(!text.contains(KEY));
    let admin = AdminClient::new(gw.admin.unwrap());
    let keys = admin.ok("GET", "/apikeys", "").await;
    for key in keys["item"].as_array().unwrap() {
        assert!(
            !text.contains(key["id"].as_str().unwrap()),
            "a key id in {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metering_flushes_are_measured_and_a_failing_store_shows() {
    let (dir, gw, _admin, _up) = start(util::ONE_PLAN, &[]).await;
    let c = client();
    let metrics_url = format!("http://{}/metrics", gw.admin.unwrap());
    // Polls the exposition until `ok` holds of it (at most 20 s).
    let until = |ok: fn(&std::collections::BTreeMap<String, f64>) -> bool| {
        let (c, url) = (client(), metrics_url.clone());
        async move {
            for _ in 0..200 {
                let body = c.get(&url, None).await.body;
                let s = samples(std::str::from_utf8(&body).unwrap());
                if ok(&s) {
                    return s;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("the metrics never got there");
        }
    };
    const WRITES: &str =
        r#"tollgate_store_operation_duration_seconds_count{operation="add_usage"}"#;
    const ERRORS: &str = r#"tollgate_store_operation_errors_total{operation="add_usage"}"#;
    const PENDING: &str = "tollgate_metering_pending";
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(KEY)).await.status, 200);
    }
    let s = until(|s| s.get(WRITES).is_some_and(|n| *n >= 1.0)).await;
    assert_eq!(s[ERRORS], 0.0);
    assert_eq!(s[PENDING], 0.0);
    assert!(s["tollgate_metering_flush_lag_seconds"] <= 5.0);

    // Another writer holds the database: the flush fails (after SQLite's 5 s busy timeout), the
    // usage waits, and both show; then it is written.
    let db = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(KEY)).await.status, 200);
    let s = until(|s| s[ERRORS] >= 1.0).await;
    assert!(s[PENDING] >= 1.0, "{s:?}");
    db.execute_batch("COMMIT").unwrap();
    until(|s| s[PENDING] == 0.0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_requests_and_last_use_are_kept_per_key_across_a_restart() {
    let plans = "usagePlans:\n  - name: tight\n    apiStages: [ { apiId: warranty, stage: prod } ]\n    \
                 throttle: { rateLimit: 0.001, burstLimit: 3 }\n    quota: { limit: 2, period: DAY }\n\
                 apiKeys:\n  - { name: central-system, value: \"${CENTRAL_KEY}\", usagePlans: [tight] }\n  \
                 - { name: idle, value: idleKeyValue0123456789abcdef, usagePlans: [tight] }\n";
    let (dir, gw, admin, _up) = start(plans, &[]).await;
    let c = client();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Two admitted, then the quota (a token taken), then the bucket is empty: 2 throttled.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let r = c.get(&gw.url("/prod/echo/r"), Some(KEY)).await;
        seen.push((r.status, r.json()["message"].as_str().map(str::to_owned)));
    }
    let msg = |m: &str| Some(m.to_string());
    assert_eq!(
        seen,
        vec![
            (200, None),
            (200, None),
            (429, msg("Limit Exceeded")),
            (429, msg("Too Many Requests")),
            (429, msg("Too Many Requests")),
        ]
    );
    let (central, idle) = (
        admin.key_id("central-system").await,
        admin.key_id("idle").await,
    );
    let plan = admin.plan_id("tight").await;
    let today = util::today();
    let detail_path =
        format!("/tollgate/usageplans/{plan}/usage?startDate={today}&endDate={today}");
    let check = |admin: AdminClient| {
        let (central, idle, plan, detail_path, today) = (
            central.clone(),
            idle.clone(),
            plan.clone(),
            detail_path.clone(),
            today.clone(),
        );
        async move {
            // lastUsedDate: to the minute, in GetApiKey and GetApiKeys; absent for a key never used.
            let key = admin.ok("GET", &format!("/apikeys/{central}"), "").await;
            let used = key["lastUsedDate"].as_u64().expect("lastUsedDate");
            assert_eq!(used % 60, 0, "{key}");
            assert!(
                before - 60 <= used && used <= before + 120,
                "{used} vs {before}"
            );
            let listed = admin.ok("GET", "/apikeys", "").await;
            for k in listed["item"].as_array().unwrap() {
                let expected = if k["id"] == central.as_str() {
                    json!(used)
                } else {
                    json!(null)
                };
                assert_eq!(k["lastUsedDate"], expected, "{k}");
            }
            // AWS's GetUsage is unchanged: [used, remaining].
            let usage = admin
                .ok(
                    "GET",
                    &format!("/usageplans/{plan}/usage?startDate={today}&endDate={today}"),
                    "",
                )
                .await;
            assert_eq!(usage["values"][&central], json!([[2, 0]]), "{usage}");
            // tollgate's own: the refusals beside it.
            let detail = admin.ok("GET", &detail_path, "").await;
            assert_eq!(
                detail["values"][&central],
                json!([{"used": 2, "remaining": 0, "throttled": 2, "quotaExceeded": 1}]),
                "{detail}"
            );
            assert_eq!(
                detail["values"][&idle],
                json!([{"used": 0, "remaining": 2, "throttled": 0, "quotaExceeded": 0}])
            );
            assert_eq!(detail["usagePlanId"], json!(plan));
            admin
        }
    };
    let admin = check(admin).await;
    drop(admin);
    assert!(gw.terminate().success());

    // Across a restart, from the store.
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let admin = check(AdminClient::new(gw.admin.unwrap())).await;
    drop(admin);
    assert!(gw.terminate().success());

    // And offline from the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "--config", "tollgate.yaml", "--plan", "tight"])
        .args(["--key", "central-system", "--detail"])
        .args(["--from", &today, "--to", &today])
        .current_dir(dir.path())
        .envs(util::admin_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table
        .lines()
        .find(|l| l.starts_with(&central))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            central.as_str(),
            "central-system",
            &today.to_string(),
            "2",
            "0",
            "2",
            "1"
        ],
        "{table}"
    );
    assert!(table.contains("THROTTLED  QUOTA EXCEEDED"), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_rotate_with_a_grace_period_expire_and_are_found_by_value() {
    let plans = "usagePlans:\n  - name: daily\n    apiStages: [ { apiId: warranty, stage: prod } ]\n    \
                 quota: { limit: 100, period: DAY }\n\
                 apiKeys:\n  - { name: central-system, value: \"${CENTRAL_KEY}\", usagePlans: [daily], \
                 tags: { team: partners }, expiresAt: \"2099-01-01T00:00:00Z\" }\n";
    let (dir, gw, admin, _up) = start(plans, &[]).await;
    let json = |gw: &Gateway, args: &[&str]| -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_str(&cli(gw, &all)).unwrap()
    };
    let c = client();
    let url = gw.url("/prod/echo/rotate");
    for _ in 0..3 {
        assert_eq!(c.get(&url, Some(KEY)).await.status, 200);
    }
    // The config's tags and expiry, and what is kept of the value: its first 4 characters.
    let found = json(&gw, &["keys", "find", "--value", KEY]);
    let id = found["id"].as_str().unwrap().to_string();
    assert_eq!(found["name"], "central-system");
    assert_eq!(found["tags"]["team"], "partners");
    assert_eq!(found["expiresAt"], "2099-01-01T00:00:00Z");
    assert_eq!(
        (found["valuePrefix"].clone(), found["valueLength"].clone()),
        (json!("cent"), json!(KEY.len()))
    );
    let table = cli(&gw, &["keys", "list"]);
    assert!(
        table.contains("VALUE STARTS") && table.contains(&format!("cent…({})", KEY.len())),
        "{table}"
    );
    assert!(!table.contains(KEY), "no value in a listing");

    // Rotated: a new value, shown once; the old one keeps working through the grace period.
    let rotated = json(&gw, &["keys", "rotate", &id, "--grace", "1h"]);
    let new = rotated["value"].as_str().unwrap().to_string();
    assert_eq!((rotated["id"].as_str(), new.len()), (Some(id.as_str()), 40));
    assert!(rotated["previousValueExpiresAt"].is_string(), "{rotated}");
    let r = c.get(&url, Some(&new)).await;
    assert_eq!(
        (r.status, util::quota_remaining(&r)),
        (200, 96),
        "the same quota count"
    );
    assert_eq!(
        c.get(&url, Some(KEY)).await.status,
        200,
        "the old value, in its grace"
    );
    assert_eq!(
        json(&gw, &["keys", "find", "--value", &new])["id"],
        id.as_str()
    );
    let again = json(&gw, &["keys", "get", &id]);
    assert_eq!(again["valuePrefix"], &new[..4]);
    assert!(again.get("value").is_none(), "shown once");

    // Across a restart the grace goes on, to the same instant.
    assert!(gw.terminate().success());
    drop(admin);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let url = gw.url("/prod/echo/rotate");
    assert_eq!(
        c.get(&url, Some(KEY)).await.status,
        200,
        "still in its grace"
    );
    let r = c.get(&url, Some(&new)).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 93));
    let after = json(&gw, &["keys", "get", &id]);
    assert_eq!(
        after["previousValueExpiresAt"],
        rotated["previousValueExpiresAt"]
    );

    // A grace beyond 30 days is refused, and changes nothing.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "rotate", &id, "--grace", "31d"])
        .env("TOLLGATE_ENDPOINT", format!("http://{}", gw.admin.unwrap()))
        .env("TOLLGATE_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
        .env("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("graceSeconds must be at most 2592000"),
        "{said}"
    );
    assert_eq!(c.get(&url, Some(&new)).await.status, 200);

    // A second rotation ends the first grace at once; --grace 0 ends it now.
    let third = "thirdValueForCentral0123456789";
    json(
        &gw,
        &["keys", "rotate", &id, "--value", third, "--grace", "0"],
    );
    assert_eq!(c.get(&url, Some(KEY)).await.status, 403, "the first value");
    assert_eq!(
        c.get(&url, Some(&new)).await.status,
        403,
        "the second value, grace 0"
    );
    assert_eq!(c.get(&url, Some(third)).await.status, 200);
    // A value another key holds (or held, in its grace) is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "create", "--name", "copycat", "--value", third])
        .env("TOLLGATE_ENDPOINT", format!("http://{}", gw.admin.unwrap()))
        .env("TOLLGATE_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
        .env("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("API Key already exists"));

    // Expiry from the CLI: in the past, refused at once; removed, back.
    json(
        &gw,
        &[
            "keys",
            "update",
            &id,
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert_eq!(c.get(&url, Some(third)).await.status, 403);
    json(&gw, &["keys", "update", &id, "--no-expiry"]);
    assert_eq!(c.get(&url, Some(third)).await.status, 200);
    cli(&gw, &["keys", "tag", &id, "owner=ops"]);
    cli(&gw, &["keys", "untag", &id, "team"]);
    assert_eq!(
        json(&gw, &["keys", "get", &id])["tags"],
        json!({"owner": "ops"})
    );
    assert!(gw.terminate().success());
}

/// Members of botocore's shapes that tollgate does not answer, and why (README, "The admin API").
const NOT_ANSWERED: &[(&str, &str, &str)] = &[(
    "ApiKeys",
    "warnings",
    "AWS fills it only for keys it cannot list; tollgate has none",
)];

/// botocore's API Gateway service model, as the installed AWS CLI reads it; `None` (the test is
/// skipped) when botocore is not installed (see [`util::have`]).
fn botocore_model() -> Option<Value> {
    // The AWS CLI since 1.44 carries its own botocore (`awscli.botocore`); before, it used the
    // `botocore` package.
    let loaders = "try:\n    import awscli.botocore.loaders as l\nexcept ImportError:\n    import botocore.loaders as l\n";
    if !util::have("python3", &["-c", loaders], "pip install awscli") {
        return None;
    }
    let out = Command::new("python3")
        .args([
            "-c",
            &format!(
                "{loaders}import json\n\
                 print(json.dumps(l.Loader().load_service_model('apigateway', 'service-2')))"
            ),
        ])
        .output();
    let out = out.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_botocore_model_is_accepted_and_answered_member_by_member() {
    let Some(model) = botocore_model() else {
        return;
    };
    let shapes = &model["shapes"];
    // The body members of a request shape (those not in the path or the query).
    let body_members = |shape: &str| -> std::collections::BTreeSet<String> {
        let members = shapes[shape]["members"].as_object().unwrap();
        members
            .iter()
            .filter(|(_, m)| m.get("location").is_none())
            .map(|(n, _)| n.clone())
            .collect()
    };
    let keys_of = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    let key_hex = "8f1c2b3a4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8";
    let (_dir, _gw, admin, _up) = start(
        "keyValueStorage: encrypted\n",
        &[("TOLLGATE_KEY_ENCRYPTION_KEY", key_hex)],
    )
    .await;

    // Every member of each create request is sent, and accepted.
    let create_key = json!({
        "name": "model", "description": "d", "enabled": true, "generateDistinctId": true,
        "value": "modelKeyValue0123456789", "stageKeys": [], "customerId": "c1",
        "tags": {"t": "v"},
    });
    assert_eq!(keys_of(&create_key), body_members("CreateApiKeyRequest"));
    let key = admin.ok("POST", "/apikeys", &create_key.to_string()).await;
    let id = key["id"].as_str().unwrap().to_string();
    let second = admin.ok("POST", "/apikeys", r#"{"name":"model-2"}"#).await;
    let create_plan = json!({
        "name": "model-plan", "description": "d",
        "apiStages": [{"apiId": "warranty", "stage": "prod",
                       "throttle": {"/pets/{id}/GET": {"rateLimit": 1.0, "burstLimit": 1}}}],
        "throttle": {"rateLimit": 10.0, "burstLimit": 20},
        "quota": {"limit": 100, "offset": 0, "period": "DAY"},
        "tags": {"t": "v"},
    });
    assert_eq!(
        keys_of(&create_plan),
        body_members("CreateUsagePlanRequest")
    );
    let plan = admin
        .ok("POST", "/usageplans", &create_plan.to_string())
        .await;
    let plan_id = plan["id"].as_str().unwrap().to_string();
    let add = json!({"op": "add", "path": "/productCode", "value": "pc"});
    let patch = json!({ "patchOperations": [add] }).to_string();
    admin
        .ok("PATCH", &format!("/usageplans/{plan_id}"), &patch)
        .await;
    let create_plan_key = json!({"keyId": id, "keyType": "API_KEY"});
    assert_eq!(
        keys_of(&create_plan_key),
        body_members("CreateUsagePlanKeyRequest")
    );
    let plan_keys = format!("/usageplans/{plan_id}/keys");
    admin
        .ok("POST", &plan_keys, &create_plan_key.to_string())
        .await;
    let other = json!({"keyId": second["id"], "keyType": "API_KEY"});
    admin.ok("POST", &plan_keys, &other.to_string()).await;

    // Every member of each answer is there under its wire name, nested shapes included.
    let today = util::today();
    let answers = [
        (
            "ApiKey",
            admin
                .ok("GET", &format!("/apikeys/{id}?includeValue=true"), "")
                .await,
        ),
        ("ApiKeys", admin.ok("GET", "/apikeys?limit=1", "").await),
        (
            "UsagePlan",
            admin.ok("GET", &format!("/usageplans/{plan_id}"), "").await,
        ),
        (
            "UsagePlanKey",
            admin
                .ok("GET", &format!("/usageplans/{plan_id}/keys/{id}"), "")
                .await,
        ),
        (
            "Usage",
            admin
                .ok(
                    "GET",
                    &format!(
                        "/usageplans/{plan_id}/usage?startDate={today}&endDate={today}&limit=1"
                    ),
                    "",
                )
                .await,
        ),
    ];
    let plan_answer = &answers[2].1;
    let nested = [
        ("ApiStage", plan_answer["apiStages"][0].clone()),
        ("ThrottleSettings", plan_answer["throttle"].clone()),
        ("QuotaSettings", plan_answer["quota"].clone()),
    ];
    let mut walked = 0;
    for (shape, answer) in answers.iter().chain(&nested) {
        for (name, member) in shapes[shape]["members"].as_object().unwrap() {
            let wire = member["locationName"].as_str().unwrap_or(name);
            if NOT_ANSWERED.iter().any(|(s, m, _)| s == shape && m == name) {
                continue;
            }
            walked += 1;
            // Lists are read a key at a time, of two: `position` names the next page.
            assert!(
                answer.get(wire).is_some(),
                "{shape}.{name} (`{wire}`) missing from {answer}"
            );
        }
    }
    assert!(walked > 30, "walked {walked} members");
}

/// UpdateUsage takes `remaining` between 0 and 2^31-1 only, answering anything else with AWS's 400;
/// a stored adjustment that is not an integer in range (written by an older version or by hand) is
/// logged with its key and plan and left out, and the gateway still starts and reports.
#[tokio::test(flavor = "multi_thread")]
async fn extreme_usage_updates_are_refused_and_a_bad_stored_row_costs_nothing() {
    let plans = "usagePlans:\n  - { name: q, apiStages: [ { apiId: warranty, stage: prod } ], \
                 quota: { limit: 10, period: MONTH } }\n\
                 apiKeys:\n  - { name: k, value: \"${CENTRAL_KEY}\", usagePlans: [q] }\n";
    let (dir, gw, admin, _up) = start(plans, &[]).await;
    let plan_id = admin.plan_id("q").await;
    let key_id = admin.ok("GET", "/apikeys?name=k", "").await["item"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/usageplans/{plan_id}/keys/{key_id}/usage");
    let body = |value: &str| {
        format!(
            r#"{{"patchOperations":[{{"op":"replace","path":"/remaining","value":"{value}"}}]}}"#
        )
    };
    for bad in [
        "-1",
        "-9223372036854775808",
        "9223372036854775807",
        "2147483648",
        "1e3",
        "x",
    ] {
        let r = admin.call("PATCH", &path, &body(bad)).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        assert_eq!(
            r.header("x-amzn-errortype"),
            Some("BadRequestException"),
            "{bad}"
        );
    }
    let c = client();
    let url = gw.url("/prod/echo/a");
    assert_eq!(util::quota_remaining(&c.get(&url, Some(KEY)).await), 9);
    // The largest grant: exactly that many left, stored as an integer.
    let r = admin.call("PATCH", &path, &body("2147483647")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = c.get(&url, Some(KEY)).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 2147483646));
    assert_eq!(admin.call("PATCH", &path, &body("0")).await.status, 200);
    assert_eq!(c.get(&url, Some(KEY)).await.status, 429);
    gw.terminate();

    // A REAL and an out-of-range integer where adjustments are kept, as a corrupt store would hold.
    let db = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
    let day: i64 = db
        .query_row("SELECT MAX(day) FROM quota_adjustments", [], |r| r.get(0))
        .unwrap();
    db.execute(
        "UPDATE quota_adjustments SET delta = -9.2233720368547758e18 WHERE day = ?1",
        [day],
    )
    .unwrap();
    db.execute(
        "INSERT INTO quota_adjustments (plan_id, key_id, day, delta) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![plan_id, key_id, day - 1, i64::MIN],
    )
    .unwrap();
    drop(db);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let admin = AdminClient::new(gw.admin.unwrap());
    let usage = admin.usage_today(&plan_id).await;
    // Both rows left out: 2 requests used of 10, none refused for them.
    assert_eq!(usage["values"][&key_id], json!([[2, 8]]), "{usage}");
    let r = client().get(&gw.url("/prod/echo/a"), Some(KEY)).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 7));
    let log = gw.stderr();
    assert!(
        log.contains("quota adjustment") && log.contains(&key_id) && log.contains(&plan_id),
        "{log}"
    );
    // UpdateUsage over the bad row replaces it.
    let r = admin.call("PATCH", &path, &body("5")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = client().get(&gw.url("/prod/echo/a"), Some(KEY)).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 4));
}

/// The `Accept` Prometheus 2.x scrapes with.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// What `promtool check metrics` says of `text`: nothing when it is clean.
fn promtool_check_metrics(text: &str) -> String {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("exit {}: {said}", out.status)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_and_places_fast_answers_under_a_millisecond() {
    let (_dir, gw, admin, _up) = start(util::ONE_PLAN, &[]).await;
    let Some(prometheus) = util::Prometheus::start(gw.admin.unwrap()) else {
        return;
    };
    let c = client();
    // Answers the gateway gives itself take tens of microseconds, even in a debug build.
    for _ in 0..200 {
        assert_eq!(c.get(&gw.url("/prod/echo/a"), None).await.status, 403);
    }
    for _ in 0..20 {
        assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(KEY)).await.status, 200);
    }
    let sent = r#"sum(tollgate_request_duration_seconds_count{http_response_status_code="403"})"#;
    prometheus.until(sent, |v| v == 200.0).await;
    // The scrape negotiated OpenMetrics and every sample went in.
    let targets = prometheus.api("targets").await;
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{targets}");
    assert_eq!(target["lastError"], "", "{targets}");
    let p50 = prometheus
        .query(r#"histogram_quantile(0.5, sum by (le) (tollgate_request_duration_seconds_bucket{http_response_status_code="403"}))"#)
        .await;
    assert!(p50 > 0.0 && p50 < 0.001, "p50 {p50} s");
    // A plan's name joins onto its id.
    let plan = admin.plan_id("p").await;
    let joined = prometheus
        .query(&format!(
            r#"sum(tollgate_decisions_total{{usage_plan="{plan}",decision="allowed"}} * on (usage_plan) group_left(name) label_replace(tollgate_usage_plan_info{{name="p"}}, "usage_plan", "$1", "id", "(.*)"))"#
        ))
        .await;
    assert_eq!(joined, 20.0);
}
