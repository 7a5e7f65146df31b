//! The store against a real SQLite file and, when `VIGIL_TEST_POSTGRES_URL` is set (as
//! `.ci/run` does), a real PostgreSQL server: the same assertions on both.

mod common;

use serde_json::json;
use vigil::storage::{ListQuery, Record, Store, StoreError};

fn record(id: &str, model: &str, t: i64, anomalous: bool, score: f64) -> Record {
    Record {
        id: id.into(),
        model: model.into(),
        model_version: "abc".into(),
        created_at: t,
        score,
        threshold: 1.0,
        is_anomalous: anomalous,
        width: 64,
        height: 48,
        regions: json!([{"x": 1}]),
        timings: json!({"total": 1.5}),
        image_sha256: "00".repeat(32),
        image_path: Some(format!("images/x/{id}.png")),
        request_id: Some("r".into()),
        part_id: None,
        alpha: None,
        pixel_threshold: Some(0.75),
        idempotency_key: None,
        request_fingerprint: None,
        warnings: Vec::new(),
        maps_version: Some("0123456789abcdef".into()),
    }
}

async fn exercise(store: &Store, prefix: &str) {
    let id = |i: u32| format!("{prefix}-0000-7000-8000-{i:012}");
    let model = format!("m-{prefix}");
    for i in 0..5u32 {
        store
            .insert(&record(&id(i), &model, 1_000 + i as i64, i % 2 == 0, i as f64))
            .await
            .unwrap();
    }
    let got = store.get(&id(3)).await.unwrap().unwrap();
    assert_eq!(got, record(&id(3), &model, 1_003, false, 3.0));
    assert!(store.get("missing").await.unwrap().is_none());
    // A request's map mix (usad's `?alpha=`) is kept with the row (another model, so
    // the listings below are unchanged; pruned with the old rows).
    // Each optional value present or absent (written as bound values or literal NULLs).
    for (i, alpha, pixel) in [(9, Some(0.25), None), (10, Some(0.5), Some(0.3)), (11, None, None)] {
        let mixed = Record {
            alpha,
            pixel_threshold: pixel,
            ..record(&id(i), &format!("{model}-mix"), 900, false, 0.5)
        };
        store.insert(&mixed).await.unwrap();
        assert_eq!(store.get(&id(i)).await.unwrap().unwrap(), mixed);
    }
    // Duplicate ids are refused (the primary key holds), and not taken for a used key.
    let twice = store.insert(&record(&id(3), &model, 1, false, 0.0)).await;
    assert!(matches!(twice, Err(StoreError::Database(_))), "{twice:?}");
    // An idempotency key is held by one record; its fingerprint and warnings come back.
    // (Newer than the retention cut-offs below, so those batches stay as they are.)
    let keyed = Record {
        idempotency_key: Some(format!("key-{prefix}")),
        request_fingerprint: Some("f1".into()),
        warnings: vec!["another size".into()],
        ..record(&id(12), &format!("{model}-mix"), 5_000, true, 0.9)
    };
    store.insert(&keyed).await.unwrap();
    let again = Record {
        idempotency_key: keyed.idempotency_key.clone(),
        request_fingerprint: Some("f2".into()),
        ..record(&id(13), &format!("{model}-mix"), 5_001, true, 0.9)
    };
    let taken = store.insert(&again).await;
    assert!(
        matches!(&taken, Err(StoreError::KeyTaken(k)) if k == &format!("key-{prefix}")),
        "{taken:?}"
    );
    let mix = format!("{model}-mix");
    let key = format!("key-{prefix}");
    assert_eq!(store.by_idempotency_key(&mix, &key).await.unwrap(), Some(keyed.clone()));
    assert_eq!(store.get(&id(12)).await.unwrap(), Some(keyed));
    assert!(store.get(&id(13)).await.unwrap().is_none());
    assert!(store.by_idempotency_key(&mix, "no such key").await.unwrap().is_none());
    // A key is its model's: another model's request may use the same one.
    let other_model = Record {
        model: format!("{model}-other"),
        ..again
    };
    store.insert(&other_model).await.unwrap();
    assert_eq!(
        store.by_idempotency_key(&other_model.model, &key).await.unwrap(),
        Some(other_model.clone())
    );
    assert!(store.by_idempotency_key(&model, &key).await.unwrap().is_none());

    let q = ListQuery {
        model: Some(model.clone()),
        limit: 2,
        ..Default::default()
    };
    let page = store.list(&q).await.unwrap();
    assert_eq!(
        page.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![id(4), id(3)]
    );
    let q = ListQuery {
        model: Some(model.clone()),
        limit: 10,
        before_id: Some(id(3)),
        anomalous: Some(true),
        ..Default::default()
    };
    assert_eq!(
        store
            .list(&q)
            .await
            .unwrap()
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>(),
        vec![id(2), id(0)]
    );
    let q = ListQuery {
        model: Some(model.clone()),
        limit: 10,
        since_us: Some(1_001),
        until_us: Some(1_003),
        ..Default::default()
    };
    assert_eq!(store.list(&q).await.unwrap().len(), 2);

    assert!(store.set_feedback(&id(0), false, Some("fine"), 5).await.unwrap());
    assert!(store.set_feedback(&id(1), true, None, 5).await.unwrap());
    assert!(
        store.set_feedback(&id(1), true, Some("again"), 6).await.unwrap(),
        "feedback replaces"
    );
    assert!(!store.set_feedback("missing", true, None, 5).await.unwrap());
    let stats = store.feedback_stats(&model).await.unwrap();
    assert_eq!(
        (stats.labelled, stats.false_positives, stats.false_negatives),
        (2, 1, 1)
    );
    assert_eq!(
        store.feedback_of(&id(1)).await.unwrap(),
        Some(vigil::storage::Feedback {
            label: "defective".into(),
            note: Some("again".into())
        })
    );
    // Filtered by label: id(0) good, id(1) defective, the other three not labelled.
    let by_label = |feedback| {
        let q = ListQuery {
            model: Some(model.clone()),
            limit: 10,
            feedback: Some(feedback),
            ..Default::default()
        };
        let store = &store;
        async move {
            let mut ids: Vec<String> = store.list(&q).await.unwrap().into_iter().map(|r| r.id).collect();
            ids.sort();
            ids
        }
    };
    use vigil::storage::FeedbackFilter;
    assert_eq!(by_label(FeedbackFilter::Good).await, vec![id(0)]);
    assert_eq!(by_label(FeedbackFilter::Defective).await, vec![id(1)]);
    assert_eq!(by_label(FeedbackFilter::Unlabelled).await, vec![id(2), id(3), id(4)]);

    // Part ids by prefix, case-sensitive, with no wildcard ('%', '_') meaning anything.
    let parts = format!("{model}-parts");
    for (i, part) in [
        (20, "LOT7-001"),
        (21, "lot7-002"),
        (22, "LOT8-001"),
        (23, "LOT7%x"),
        (24, "LOTX_1"),
    ] {
        let r = Record {
            part_id: Some(part.into()),
            ..record(&id(i), &parts, 2_000, false, 0.1)
        };
        store.insert(&r).await.unwrap();
    }
    let with_prefix = |prefix: &str| {
        let q = ListQuery {
            model: Some(parts.clone()),
            limit: 10,
            part_prefix: Some(prefix.into()),
            ..Default::default()
        };
        let store = &store;
        async move {
            let mut got: Vec<String> = store
                .list(&q)
                .await
                .unwrap()
                .into_iter()
                .filter_map(|r| r.part_id)
                .collect();
            got.sort();
            got
        }
    };
    assert_eq!(with_prefix("LOT7").await, vec!["LOT7%x", "LOT7-001"]);
    assert_eq!(with_prefix("LOT7%").await, vec!["LOT7%x"]);
    assert_eq!(with_prefix("LOT_").await, Vec::<String>::new());
    assert_eq!(with_prefix("lot").await, vec!["lot7-002"]);

    // The record of one request, by the request id it was sent with.
    let sent = Record {
        request_id: Some(format!("{model}-req-9")),
        ..record(&id(30), &parts, 2_000, false, 0.1)
    };
    store.insert(&sent).await.unwrap();
    let q = ListQuery {
        request_id: Some(format!("{model}-req-9")),
        limit: 10,
        ..Default::default()
    };
    let found: Vec<String> = store.list(&q).await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(found, vec![id(30)]);

    // Jobs of a server that went quiet are interrupted; a live one's are not, whatever
    // their age (replicas share a PostgreSQL database).
    for (i, status) in [(0, "running"), (1, "running"), (2, "queued"), (3, "succeeded")] {
        let job = vigil::storage::jobs::JobRow {
            id: format!("{prefix}-job-{i}"),
            model: format!("{model}-{i}"),
            status: status.into(),
            message: None,
            options: "[]".into(),
            data: "/d".into(),
            created_at: 100,
            finished_at: None,
        };
        store.insert_job(&job).await.unwrap();
    }
    let job = |i: u32| format!("{prefix}-job-{i}");
    // One unfinished job per model, whichever server asks.
    let twin = vigil::storage::jobs::JobRow {
        id: format!("{prefix}-job-twin"),
        ..store.job(&job(1)).await.unwrap().unwrap()
    };
    assert!(matches!(
        store.insert_job(&twin).await,
        Err(vigil::storage::StoreError::Conflict(_))
    ));
    store.heartbeat_jobs(&[job(1)], 1_000).await.unwrap();
    store.interrupt_abandoned_jobs(2_000, Some(500)).await.unwrap();
    for (i, want) in [(0, "failed"), (1, "running"), (2, "failed"), (3, "succeeded")] {
        let row = store.job(&job(i)).await.unwrap().unwrap();
        assert_eq!(row.status, want, "job {i}");
    }
    // Later, its server quiet too (a cut-off long before any real job's time, so a shared
    // database's other rows are left alone).
    store.interrupt_abandoned_jobs(2_000, Some(1_500)).await.unwrap();
    assert_eq!(store.job(&job(1)).await.unwrap().unwrap().status, "failed");
    store
        .insert_job(&twin)
        .await
        .expect("the name is free once its job ended");

    // A batch takes the oldest records before the cut-off and names exactly their
    // images: the three mixed rows (900) first, then id(0) (1000), then id(1) (1001).
    let pruned = store.prune_batch(1_002, 3).await.unwrap();
    assert_eq!(pruned.records, 3);
    let mut want: Vec<String> = [9, 10, 11].iter().map(|&i| format!("images/x/{}.png", id(i))).collect();
    let mut got = pruned.images.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(store.get(&id(0)).await.unwrap().is_some(), "newer than the batch");
    let mut pruned = store.prune_batch(1_002, 3).await.unwrap();
    pruned.images.sort();
    assert_eq!(
        pruned.images,
        vec![format!("images/x/{}.png", id(0)), format!("images/x/{}.png", id(1))]
    );
    assert_eq!(pruned.records, 2);
    assert!(store.get(&id(0)).await.unwrap().is_none());
    assert!(store.get(&id(1)).await.unwrap().is_none());
    assert!(store.get(&id(2)).await.unwrap().is_some());
    assert!(store.ping().await);
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("a.db").display());
    let store = Store::connect(&url).await.unwrap();
    assert_eq!(store.backend, "sqlite");
    exercise(&store, "0190aaaa-aaaa").await;
    // Reopening runs the migrations again without harm and keeps the rows.
    drop(store);
    let store = Store::connect(&url).await.unwrap();
    assert!(store
        .get("0190aaaa-aaaa-0000-7000-8000-000000000004")
        .await
        .unwrap()
        .is_some());
}

#[tokio::test]
async fn postgres_store() {
    let Some(url) = common::postgres_url("postgres_store") else {
        return;
    };
    exercise_postgres(&url).await;
}

/// The store's full exercise on the PostgreSQL server at `url`, under ids of this run's own;
/// the connection is closed on return.
async fn exercise_postgres(url: &str) {
    let store = Store::connect(url).await.unwrap();
    assert_eq!(store.backend, "postgres");
    exercise(&store, &unique_prefix()).await;
}

/// Ids of this run's own on a server whose tables outlive it.
fn unique_prefix() -> String {
    format!(
        "{:08x}-{:04x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 65536
    )
}

/// `VIGIL_TEST_POSTGRES_TLS_URL` names a role the server lets in over TLS only, with
/// `sslmode=verify-full` and the server's CA as `sslrootcert` (.ci/run sets this up), so a
/// store that connected at all connected encrypted, to the server its certificate names.
#[tokio::test]
async fn postgres_over_tls_checks_the_servers_certificate() {
    let Some(url) = common::postgres_tls_url("postgres_over_tls_checks_the_servers_certificate") else {
        return;
    };
    exercise_postgres(&url).await;

    // The server's certificate is signed by a CA of the run's own, which no public root
    // vouches for: without `sslrootcert` the connection must be refused, at once and
    // saying why, not retried as if the server were still starting.
    let without_ca = common::without_ca(&url);
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), Store::connect(without_ca))
        .await
        .expect("a certificate that fails is reported, not waited on")
        .err()
        .expect("a certificate no trusted root signs is refused");
    assert!(!refused.is_unreachable(), "{refused}");
    assert!(refused.to_string().to_lowercase().contains("certificate"), "{refused}");

    // And the role is refused in plain text, so the first connection was encrypted.
    let plain = format!("{}?sslmode=disable", url.split_once('?').unwrap().0);
    let refused = Store::connect(&plain)
        .await
        .err()
        .expect("plain text is refused to this role");
    assert!(refused.to_string().contains("no encryption"), "{refused}");
}

#[tokio::test]
async fn postgres_with_a_client_certificate_logs_in_by_it() {
    let Some(url) = common::postgres_cert_url("postgres_with_a_client_certificate_logs_in_by_it") else {
        return;
    };
    exercise_postgres(&url).await;

    // The role has no password and no other way in: without the certificate the server
    // refuses the login, and that is reported as such, not retried as a server starting.
    let (base, query) = url.split_once('?').unwrap();
    let without_certificate = format!(
        "{base}?{}",
        query
            .split('&')
            .filter(|p| !p.starts_with("sslcert=") && !p.starts_with("sslkey="))
            .collect::<Vec<_>>()
            .join("&")
    );
    let refused = Store::connect(&without_certificate)
        .await
        .err()
        .expect("the role is let in by its certificate only");
    assert!(!refused.is_unreachable(), "{refused}");
    assert!(refused.to_string().contains("certificate"), "{refused}");

    // A key file that is not there is a mistake in the URL, reported at once with its path.
    let missing = url.replace("client.key", "no-such.key");
    let refused = tokio::time::timeout(std::time::Duration::from_secs(30), Store::connect(&missing))
        .await
        .expect("a missing key file is reported, not waited on")
        .err()
        .expect("no key, no login");
    assert!(!refused.is_unreachable(), "{refused}");
    assert!(refused.to_string().contains("no-such.key"), "{refused}");
}

#[tokio::test]
async fn a_certificate_file_the_url_names_must_exist() {
    // Port 1 on loopback refuses at once, which would count as "not up yet": the missing
    // file must be reported first, with its path, and not as worth waiting for.
    let url = "postgres://vigil@127.0.0.1:1/vigil?sslmode=verify-full&ssl-root-cert=/no/such/ca.crt";
    let err = Store::connect(url).await.err().expect("the CA file is not there");
    assert!(!err.is_unreachable(), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("ssl-root-cert") && message.contains("/no/such/ca.crt"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_reported_with_its_cause() {
    // Port 1 on loopback: nothing listens there, so the connection is refused at once.
    let err = Store::connect("postgres://vigil:secret@127.0.0.1:1/vigil")
        .await
        .err()
        .expect("no server listens on port 1")
        .to_string();
    assert!(!err.contains("pool timed out"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert!(!err.contains("secret"), "the password was shown: {err}");
}

#[tokio::test]
async fn a_database_that_takes_the_connection_and_never_answers_is_given_up() {
    // A listener that accepts and stays silent: a hung server, or a firewall that swallows.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let url = format!("postgres://vigil:secret@127.0.0.1:{port}/vigil");
    let connecting = Store::connect(&url);
    let err = tokio::time::timeout(std::time::Duration::from_secs(60), connecting)
        .await
        .expect("given up within its own bound, not hanging")
        .err()
        .expect("nothing answers");
    assert!(err.is_unreachable(), "worth trying again at start: {err}");
    assert!(err.to_string().contains("did not answer"), "{err}");
    held.abort();
}
