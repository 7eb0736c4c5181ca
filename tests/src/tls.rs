//! Certificates for tests of TLS, made with the openssl CLI.

use std::path::Path;

/// PEM files: a certificate for 127.0.0.1, its key, and the CA that signed it.
pub struct TlsFiles {
    pub cert: String,
    pub key: String,
    pub ca: String,
}

/// Generates a fresh CA in `dir` and a certificate for 127.0.0.1 signed by it.
pub fn material(dir: &Path) -> TlsFiles {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("running openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=convoy-test-ca",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "node.key",
        "-out",
        "node.csr",
        "-subj",
        "/CN=convoy-node",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "node.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "node.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let path = |f: &str| dir.join(f).display().to_string();
    TlsFiles { cert: path("node.pem"), key: path("node.key"), ca: path("ca.pem") }
}
