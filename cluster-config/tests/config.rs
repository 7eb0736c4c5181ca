use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use convoy_config::{Config, ConfigError, LogFormat, OtlpProtocol};

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn toml_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            toml_files(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "toml") {
            found.push(path);
        }
    }
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn file_with(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn load_env(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::load_with_env(None, env(vars))
}

// Examples.

#[test]
fn every_example_loads_and_validates() {
    let mut files = Vec::new();
    toml_files(&examples_dir(), &mut files);
    assert!(files.len() >= 4, "expected the shipped examples, found {files:?}");
    for file in files {
        let config = Config::load_with_env(Some(&file), no_env())
            .unwrap_or_else(|e| panic!("{} does not load: {e}", file.display()));
        config.validate().unwrap();
    }
}

#[test]
fn single_example_documents_the_defaults() {
    let config = Config::load_with_env(Some(&examples_dir().join("single.toml")), no_env()).unwrap();
    assert_eq!(config, Config::default());
}

#[test]
fn local_cluster_examples_agree() {
    let nodes: Vec<Config> = (1..=3)
        .map(|i| {
            let path = examples_dir().join(format!("local-3/n{i}.toml"));
            Config::load_with_env(Some(&path), no_env()).unwrap()
        })
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        let offset = 10 * i as u16;
        assert_eq!(node.node.id, format!("n{}", i + 1));
        assert_eq!(node.node.data_dir, PathBuf::from(format!("./convoy-data/n{}", i + 1)));
        assert_eq!(node.client.listen.port(), 7600 + offset);
        assert_eq!(node.admin.listen.port(), 7601 + offset);
        assert_eq!(node.cluster.listen.port(), 7700 + offset);
        assert_eq!(node.cluster.cookie, nodes[0].cluster.cookie);
        assert_eq!(node.auth.secret, nodes[0].auth.secret);
        assert!(node.auth.secret.as_ref().unwrap().len() >= 32);
        let mut expected_seeds: Vec<String> = nodes
            .iter()
            .filter(|other| other.node.id != node.node.id)
            .map(|other| other.cluster.advertise_addr())
            .collect();
        expected_seeds.sort();
        let mut seeds = node.cluster.seeds.clone();
        seeds.sort();
        assert_eq!(seeds, expected_seeds);
    }
}

// Defaults and round trips.

#[test]
fn defaults_validate() {
    Config::default().validate().unwrap();
    assert_eq!(Config::from_toml_str("").unwrap(), Config::default());
    assert_eq!(Config::load_with_env(None, no_env()).unwrap(), Config::default());
}

#[test]
fn default_values() {
    let c = Config::default();
    assert_eq!(c.node.id, "n1");
    assert_eq!(c.client.listen.to_string(), "127.0.0.1:7600");
    assert_eq!(c.admin.listen.to_string(), "127.0.0.1:7601");
    assert_eq!(c.cluster.listen.to_string(), "127.0.0.1:7700");
    assert_eq!(c.cluster.advertise_addr(), "127.0.0.1:7700");
    assert_eq!(c.auth.max_token_ttl, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(c.storage.cache_capacity_bytes, 134_217_728);
    assert_eq!(c.storage.max_batch_bytes, 4 * 1024 * 1024);
    assert_eq!(c.storage.max_staged_bytes, 32 * 1024);
    assert_eq!(c.timeouts.receipt_timeout, Duration::from_secs(300));
    assert_eq!(c.telemetry.log_format, LogFormat::Text);
    assert_eq!(c.telemetry.otlp_protocol, OtlpProtocol::Grpc);
    assert!(!c.chaos.enabled);
}

#[test]
fn to_toml_string_round_trips() {
    let defaults = Config::default();
    let text = defaults.to_toml_string();
    assert!(!text.contains("tls_cert"), "unset options are omitted:\n{text}");
    assert_eq!(Config::from_toml_str(&text).unwrap(), defaults);

    let mut full = Config::default();
    full.node.id = "edge-7".into();
    full.client.tls_cert = Some("/etc/convoy/c.crt".into());
    full.client.tls_key = Some("/etc/convoy/c.key".into());
    full.auth.secret = Some("0123456789abcdef0123456789abcdef".into());
    full.cluster.advertise = Some("node7.internal:7700".into());
    full.cluster.seeds = vec!["a:7700".into(), "b:7700".into()];
    full.cluster.tls_cert = Some("/etc/convoy/n.crt".into());
    full.cluster.tls_key = Some("/etc/convoy/n.key".into());
    full.cluster.tls_ca = Some("/etc/convoy/ca.crt".into());
    full.raft.heartbeat_interval = Duration::from_millis(75);
    full.telemetry.log_format = LogFormat::Json;
    full.telemetry.otlp_endpoint = Some("http://127.0.0.1:4318".into());
    full.telemetry.otlp_protocol = OtlpProtocol::HttpProtobuf;
    full.telemetry.sampling_ratio = 0.1;
    full.chaos.enabled = true;
    full.webhooks.url = Some("https://hooks.example.com/x".into());
    full.webhooks.secret = Some("webhook-secret-16b".into());
    let text = full.to_toml_string();
    assert!(text.contains("otlp_protocol = \"http_protobuf\""), "{text}");
    assert_eq!(Config::from_toml_str(&text).unwrap(), full);
}

#[test]
fn partial_sections_keep_other_defaults() {
    let c = Config::from_toml_str("[raft]\nheartbeat_interval = \"50ms\"\n[limits]\nmax_frame_bytes = 2048\n").unwrap();
    assert_eq!(c.raft.heartbeat_interval, Duration::from_millis(50));
    assert_eq!(c.raft.election_timeout_min, Duration::from_millis(300));
    assert_eq!(c.limits.max_frame_bytes, 2048);
    assert_eq!(c.limits.max_text_chars, 4000);
}

// Environment overrides.

#[test]
fn env_overrides_each_kind_of_value() {
    let secret = "s".repeat(40);
    let c = load_env(&[
        ("CONVOY_AUTH_SECRET", &secret),
        ("CONVOY_LIMITS_MAX_FRAME_BYTES", "2048"),
        ("CONVOY_CLUSTER_SEEDS", "a:1,b:2"),
        ("CONVOY_RAFT_HEARTBEAT_INTERVAL", "50ms"),
        ("CONVOY_NODE_ID", "n7"),
        ("CONVOY_CHAOS_ENABLED", "true"),
        ("CONVOY_TELEMETRY_SAMPLING_RATIO", "0.1"),
        ("CONVOY_TELEMETRY_LOG_FORMAT", "json"),
        ("CONVOY_CLIENT_LISTEN", "0.0.0.0:9000"),
    ])
    .unwrap();
    assert_eq!(c.auth.secret.as_deref(), Some(secret.as_str()));
    assert_eq!(c.limits.max_frame_bytes, 2048);
    assert_eq!(c.cluster.seeds, ["a:1", "b:2"]);
    assert_eq!(c.raft.heartbeat_interval, Duration::from_millis(50));
    assert_eq!(c.node.id, "n7");
    assert!(c.chaos.enabled);
    assert_eq!(c.telemetry.sampling_ratio, 0.1);
    assert_eq!(c.telemetry.log_format, LogFormat::Json);
    assert_eq!(c.client.listen.to_string(), "0.0.0.0:9000");
}

#[test]
fn env_strings_that_look_like_numbers_stay_strings() {
    let c = load_env(&[("CONVOY_AUTH_SECRET", "12345678901234567890123456789012345")]).unwrap();
    assert_eq!(c.auth.secret.as_deref(), Some("12345678901234567890123456789012345"));
}

#[test]
fn env_lists_accept_toml_arrays_and_empty_values() {
    let c = load_env(&[("CONVOY_CLUSTER_SEEDS", r#"["a:1", "b:2"]"#)]).unwrap();
    assert_eq!(c.cluster.seeds, ["a:1", "b:2"]);
    let c = load_env(&[("CONVOY_CLUSTER_SEEDS", " a:1 , b:2 ,")]).unwrap();
    assert_eq!(c.cluster.seeds, ["a:1", "b:2"]);
    let c = load_env(&[("CONVOY_CLUSTER_SEEDS", "")]).unwrap();
    assert!(c.cluster.seeds.is_empty());

    let err = load_env(&[("CONVOY_CLUSTER_SEEDS", "[\"a:1\"")]).unwrap_err();
    assert_parse(&err, "environment", "cluster.seeds");
}

#[test]
fn env_beats_file() {
    let file = file_with("[limits]\nmax_frame_bytes = 4096\nmax_text_chars = 100\n[cluster]\nseeds = [\"x:1\"]\n");
    let c = Config::load_with_env(
        Some(file.path()),
        env(&[("CONVOY_LIMITS_MAX_FRAME_BYTES", "2048"), ("CONVOY_CLUSTER_SEEDS", "a:1,b:2")]),
    )
    .unwrap();
    assert_eq!(c.limits.max_frame_bytes, 2048);
    assert_eq!(c.limits.max_text_chars, 100, "keys the environment does not set come from the file");
    assert_eq!(c.cluster.seeds, ["a:1", "b:2"]);
}

#[test]
fn standard_opentelemetry_variables_configure_tracing() {
    let c = load_env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://jaeger:4318"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("OTEL_SERVICE_NAME", "convoy-eu"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
    ])
    .unwrap();
    assert_eq!(c.telemetry.otlp_endpoint.as_deref(), Some("http://jaeger:4318"));
    assert_eq!(c.telemetry.otlp_protocol, OtlpProtocol::HttpProtobuf);
    assert_eq!(c.telemetry.service_name, "convoy-eu");
    assert_eq!(c.telemetry.sampling_ratio, 0.25);
    let ours = load_env(&[
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ("CONVOY_TELEMETRY_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
    ])
    .unwrap();
    assert_eq!(ours.telemetry.otlp_protocol, OtlpProtocol::Grpc, "Convoy's own variable wins");
    assert_eq!(ours.telemetry.otlp_endpoint.as_deref(), Some("http://a:4317"));
    let err = load_env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")]).unwrap_err();
    assert!(err.to_string().contains("telemetry.otlp_protocol"), "{err}");
}

#[test]
fn env_outside_the_config_sections_is_ignored() {
    let c = load_env(&[("CONVOY_CONFIG", "/etc/convoy.toml"), ("CONVOY_CONFIG_PATH", "x"), ("PATH", "/bin")]).unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn env_unknown_key_in_a_section_is_an_error() {
    let err = load_env(&[("CONVOY_AUTH_SECRETT", "x")]).unwrap_err();
    assert_parse(&err, "environment", "auth.secrett");
    let text = err.to_string();
    assert!(text.contains("CONVOY_AUTH_SECRETT") && text.contains("hello_timeout"), "{text}");
}

#[test]
fn bad_env_value_names_key_and_environment() {
    let err = load_env(&[("CONVOY_LIMITS_MAX_FRAME_BYTES", "lots")]).unwrap_err();
    assert_parse(&err, "environment", "limits.max_frame_bytes");
    let text = err.to_string();
    assert!(text.contains("lots"), "{text}");

    let err = load_env(&[("CONVOY_RAFT_HEARTBEAT_INTERVAL", "soon")]).unwrap_err();
    assert_parse(&err, "environment", "raft.heartbeat_interval");
}

#[test]
fn env_values_are_validated() {
    let err = load_env(&[("CONVOY_LIMITS_MAX_FRAME_BYTES", "10")]).unwrap_err();
    assert_eq!(err.key(), Some("limits.max_frame_bytes"));
}

// File errors.

fn assert_parse(err: &ConfigError, expected_origin: &str, expected_key: &str) {
    match err {
        ConfigError::Parse { origin, key, .. } => {
            assert_eq!(origin, expected_origin, "{err}");
            assert_eq!(key.as_deref(), Some(expected_key), "{err}");
        }
        other => panic!("expected a parse error for {expected_key}, got {other:?}"),
    }
}

#[test]
fn unknown_key_in_file_is_named_with_valid_keys() {
    let file = file_with("[limits]\nmax_frame_byte = 2048\n");
    let err = Config::load_with_env(Some(file.path()), no_env()).unwrap_err();
    assert_parse(&err, &file.path().display().to_string(), "limits.max_frame_byte");
    let text = err.to_string();
    assert!(text.contains("max_frame_bytes") && text.contains(&file.path().display().to_string()), "{text}");
}

#[test]
fn unknown_key_in_file_is_blamed_on_the_file_even_when_env_sets_the_section() {
    let file = file_with("[limits]\nmax_frame_byte = 2048\n");
    let err = Config::load_with_env(Some(file.path()), env(&[("CONVOY_LIMITS_MAX_TEXT_CHARS", "10")])).unwrap_err();
    assert_parse(&err, &file.path().display().to_string(), "limits.max_frame_byte");
}

#[test]
fn bad_file_value_is_blamed_on_the_file_even_when_env_sets_the_section() {
    let file = file_with("[limits]\nmax_frame_bytes = \"big\"\n");
    let err = Config::load_with_env(Some(file.path()), env(&[("CONVOY_LIMITS_MAX_TEXT_CHARS", "10")])).unwrap_err();
    assert_parse(&err, &file.path().display().to_string(), "limits.max_frame_bytes");
}

#[test]
fn unknown_section_in_file_is_named() {
    let err = Config::from_toml_str("[nodes]\nid = \"n1\"\n").unwrap_err();
    assert_parse(&err, "TOML text", "nodes");
    assert!(err.to_string().contains("cluster"), "{err}");
}

#[test]
fn wrong_type_in_file_names_key_and_file() {
    let file = file_with("[cluster]\nshards = \"many\"\n");
    let err = Config::load_with_env(Some(file.path()), no_env()).unwrap_err();
    assert_parse(&err, &file.path().display().to_string(), "cluster.shards");

    let err = Config::from_toml_str("[telemetry]\nlog_format = \"xml\"\n").unwrap_err();
    assert_parse(&err, "TOML text", "telemetry.log_format");
    assert!(err.to_string().contains("json"), "{err}");
}

#[test]
fn toml_syntax_error_names_file_and_line() {
    let file = file_with("[node]\nid = \"n1\"\ndata_dir = \n");
    let err = Config::load_with_env(Some(file.path()), no_env()).unwrap_err();
    match &err {
        ConfigError::Parse { origin, message, .. } => {
            assert_eq!(origin, &file.path().display().to_string());
            assert!(message.contains("line 3"), "{message}");
        }
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn missing_file_names_path() {
    let path = Path::new("/nonexistent/convoy.toml");
    let err = Config::load_with_env(Some(path), no_env()).unwrap_err();
    match &err {
        ConfigError::Read { path: p, .. } => assert_eq!(p, path),
        other => panic!("expected a read error, got {other:?}"),
    }
    assert!(err.to_string().contains("/nonexistent/convoy.toml"), "{err}");
}

// Validation rules: each case breaks exactly one rule of an otherwise default configuration.

const VALID_SECRET: &str = "0123456789abcdef0123456789abcdef";

#[test]
fn each_rule_names_its_key() {
    let cases: &[(&str, &str)] = &[
        ("[node]\nid = \"\"", "node.id"),
        ("[node]\nid = \"N1\"", "node.id"),
        ("[node]\nid = \"1node\"", "node.id"),
        ("[node]\nid = \"n_1\"", "node.id"),
        ("[node]\nid = \"a23456789012345678901234567890123\"", "node.id"),
        ("[node]\ndata_dir = \"\"", "node.data_dir"),
        ("[client]\ntls_cert = \"c.pem\"", "client.tls_key"),
        ("[client]\ntls_key = \"k.pem\"", "client.tls_cert"),
        ("[admin]\nlisten = \"127.0.0.1:7600\"", "admin.listen"),
        ("[cluster]\nlisten = \"127.0.0.1:7601\"", "cluster.listen"),
        ("[auth]\nsecret = \"short\"", "auth.secret"),
        ("[auth]\nhello_timeout = \"0s\"", "auth.hello_timeout"),
        ("[auth]\nmax_token_ttl = \"0s\"", "auth.max_token_ttl"),
        ("[cluster]\nadvertise = \"nohost\"", "cluster.advertise"),
        ("[cluster]\nadvertise = \"host:0\"", "cluster.advertise"),
        ("[cluster]\ncookie = \"short\"", "cluster.cookie"),
        (&format!("[cluster]\ncookie = \"{}\"", "c".repeat(129)), "cluster.cookie"),
        ("[cluster]\nseeds = [\"a:1\", \"b\"]", "cluster.seeds[1]"),
        ("[cluster]\nshards = 0", "cluster.shards"),
        ("[cluster]\nshards = 257", "cluster.shards"),
        ("[cluster]\nreplication_factor = 0", "cluster.replication_factor"),
        ("[cluster]\nreplication_factor = 8", "cluster.replication_factor"),
        ("[cluster]\nheartbeat_interval = \"0s\"\nfailure_timeout = \"1s\"", "cluster.heartbeat_interval"),
        ("[cluster]\nfailure_timeout = \"400ms\"", "cluster.failure_timeout"),
        ("[cluster]\nreconnect_backoff_max = \"0s\"", "cluster.reconnect_backoff_max"),
        ("[cluster]\ntls_cert = \"c.pem\"\ntls_ca = \"ca.pem\"", "cluster.tls_key"),
        ("[cluster]\ntls_key = \"k.pem\"", "cluster.tls_cert"),
        ("[cluster]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"", "cluster.tls_ca"),
        ("[cluster]\ntls_ca = \"ca.pem\"", "cluster.tls_cert"),
        ("[raft]\nheartbeat_interval = \"5ms\"", "raft.heartbeat_interval"),
        ("[raft]\nelection_timeout_min = \"100ms\"", "raft.election_timeout_min"),
        ("[raft]\nelection_timeout_max = \"300ms\"", "raft.election_timeout_max"),
        ("[raft]\nsnapshot_every_entries = 0", "raft.snapshot_every_entries"),
        ("[raft]\nmax_payload_entries = 0", "raft.max_payload_entries"),
        ("[storage]\ncache_capacity_bytes = 0", "storage.cache_capacity_bytes"),
        ("[storage]\nmax_batch_bytes = 0", "storage.max_batch_bytes"),
        ("[storage]\nmax_staged_bytes = 0", "storage.max_staged_bytes"),
        ("[storage]\nqueue_depth = 0", "storage.queue_depth"),
        ("[limits]\nmax_frame_bytes = 1023", "limits.max_frame_bytes"),
        ("[limits]\nmax_frame_bytes = 16777217", "limits.max_frame_bytes"),
        ("[limits]\nmax_text_chars = 0", "limits.max_text_chars"),
        ("[limits]\nmax_members_per_group = 0", "limits.max_members_per_group"),
        ("[limits]\nmax_groups_per_user = 0", "limits.max_groups_per_user"),
        ("[limits]\nrequests_per_second = 0", "limits.requests_per_second"),
        ("[limits]\nrequest_burst = 0", "limits.request_burst"),
        ("[limits]\nrate_limit_strikes = 0", "limits.rate_limit_strikes"),
        ("[limits]\nmax_pending_requests = 0", "limits.max_pending_requests"),
        ("[limits]\noutbound_queue = 0", "limits.outbound_queue"),
        ("[limits]\nmax_connections = 0", "limits.max_connections"),
        ("[limits]\nmax_active_entities = 0", "limits.max_active_entities"),
        ("[limits]\nentity_mailbox = 0", "limits.entity_mailbox"),
        ("[limits]\nmax_receipt_watches_per_group = 0", "limits.max_receipt_watches_per_group"),
        ("[limits]\nsync_limit_max = 0", "limits.sync_limit_max"),
        ("[limits]\nsync_limit_max = 501", "limits.sync_limit_max"),
        ("[timeouts]\nreceipt_timeout = \"0s\"", "timeouts.receipt_timeout"),
        ("[timeouts]\nentity_idle = \"0s\"", "timeouts.entity_idle"),
        ("[timeouts]\nping_interval = \"0s\"", "timeouts.ping_interval"),
        ("[timeouts]\npong_timeout = \"20s\"", "timeouts.pong_timeout"),
        ("[timeouts]\nrequest_timeout = \"0s\"", "timeouts.request_timeout"),
        ("[timeouts]\nleader_wait = \"0s\"", "timeouts.leader_wait"),
        ("[timeouts]\nshutdown_grace = \"0s\"", "timeouts.shutdown_grace"),
        ("[telemetry]\nlog_level = \" \"", "telemetry.log_level"),
        ("[telemetry]\notlp_endpoint = \"localhost:4317\"", "telemetry.otlp_endpoint"),
        ("[telemetry]\nservice_name = \"\"", "telemetry.service_name"),
        ("[telemetry]\nsampling_ratio = 1.5", "telemetry.sampling_ratio"),
        ("[telemetry]\nsampling_ratio = -0.1", "telemetry.sampling_ratio"),
        ("[telemetry]\nsampling_ratio = nan", "telemetry.sampling_ratio"),
        ("[webhooks]\nurl = \"ftp://example.com\"\nsecret = \"0123456789abcdef\"", "webhooks.url"),
        ("[webhooks]\nurl = \"https://example.com/hook\"", "webhooks.secret"),
        ("[webhooks]\nurl = \"https://example.com/hook\"\nsecret = \"short\"", "webhooks.secret"),
        ("[webhooks]\ntimeout = \"0s\"", "webhooks.timeout"),
        ("[webhooks]\nmax_attempts = 0", "webhooks.max_attempts"),
        ("[webhooks]\nqueue = 0", "webhooks.queue"),
    ];
    for (text, expected_key) in cases {
        let err = Config::from_toml_str(text).expect_err(text);
        match &err {
            ConfigError::Invalid { key, problem, .. } => {
                assert_eq!(key, expected_key, "for {text:?}: {err}");
                assert!(!problem.is_empty());
            }
            other => panic!("for {text:?}: expected a validation error, got {other:?}"),
        }
    }
}

#[test]
fn valid_edge_values_pass() {
    let cases = [
        "[node]\nid = \"a23456789012345678901234567890ab\"",
        "[node]\nid = \"edge-01\"",
        "[cluster]\nadvertise = \"[::1]:7700\"\nseeds = [\"node-2.internal:7700\", \"10.0.0.3:7700\"]",
        "[cluster]\nshards = 256\nreplication_factor = 1",
        "[cluster]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_ca = \"ca.pem\"",
        "[client]\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"",
        "[client]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[cluster]\nlisten = \"127.0.0.1:0\"",
        "[raft]\nheartbeat_interval = \"10ms\"\nelection_timeout_min = \"11ms\"\nelection_timeout_max = \"12ms\"",
        "[limits]\nmax_frame_bytes = 1024\nsync_limit_max = 1",
        "[limits]\nmax_frame_bytes = 16777216",
        "[telemetry]\nsampling_ratio = 0.0\notlp_endpoint = \"https://otel.example.com:4318\"",
        "[webhooks]\nurl = \"http://127.0.0.1:9000/hook\"\nsecret = \"0123456789abcdef\"",
    ];
    for text in cases {
        Config::from_toml_str(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    }
    let secret = format!("[auth]\nsecret = \"{VALID_SECRET}\"");
    Config::from_toml_str(&secret).unwrap();
}

#[test]
fn invalid_error_reads_as_key_value_problem() {
    let err = Config::from_toml_str("[raft]\nelection_timeout_min = \"50ms\"").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration: raft.election_timeout_min = 50ms: \
         must be greater than raft.heartbeat_interval (150ms)"
    );
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    let err = Config::from_toml_str("[auth]\nsecret = \"hunter2-hunter2\"").unwrap_err();
    let text = err.to_string();
    assert!(text.contains("auth.secret") && !text.contains("hunter2"), "{text}");
}
