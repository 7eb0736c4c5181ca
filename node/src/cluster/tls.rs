//! TLS for node-to-node sessions, used when `cluster.tls_cert`, `tls_key` and `tls_ca` are
//! set: every node presents its certificate, and a node dialing a peer checks the peer's
//! certificate against the cluster's CA (for the address it dials, so certificates name
//! the nodes' advertised hosts or IPs). The cookie still authenticates the session.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} from {path}: {detail}")]
    Read { what: &'static str, path: String, detail: String },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The server and client sides of the cluster's TLS.
#[derive(Clone)]
pub struct ClusterTls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

fn certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |detail: String| TlsError::Read { what, path: path.display().to_string(), detail };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| read(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

impl ClusterTls {
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<ClusterTls, TlsError> {
        let chain = certs(cert, "the node certificate (cluster.tls_cert)")?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
            what: "the node key (cluster.tls_key)",
            path: key.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in certs(ca, "the cluster CA (cluster.tls_ca)")? {
            roots.add(ca).map_err(|e| TlsError::Config(format!("cluster.tls_ca: {e}")))?;
        }
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(format!("cluster.tls_cert/tls_key: {e}")))?;
        let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        Ok(ClusterTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name a peer's certificate must carry, from the address we dial (`host:port`).
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
    ServerName::try_from(host.to_string()).map_err(|e| TlsError::Config(format!("cannot verify {addr:?}: {e}")))
}
