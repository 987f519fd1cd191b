//! Certificates made by the test: a CA, server certificates for 127.0.0.1, and client
//! certificates with SPIFFE IDs, each written as PEM files into a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};

/// A certificate authority and the files it issued.
pub struct Pki {
    /// Where the PEM files are.
    pub dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    name: String,
}

/// A certificate and key on disk.
pub struct Pair {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl Pki {
    /// A new CA named `name`; its certificate is `<name>-ca.pem`.
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(format!("{name}-ca.pem")), ca.pem()).unwrap();
        Self {
            dir,
            ca,
            name: name.to_string(),
        }
    }

    /// The CA certificate file.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join(format!("{}-ca.pem", self.name))
    }

    /// A server certificate for 127.0.0.1 and localhost with common name `cn`, written to
    /// `<file>.pem` and `<file>.key`.
    pub fn server(&self, file: &str, cn: &str) -> Pair {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(file, p)
    }

    /// A fleet host's certificate: server and client at once (it serves its API and calls its
    /// peers with it), for 127.0.0.1 (the test's relay) and `ip` (the fleet's bridge), with
    /// SPIFFE ID `spiffe`.
    pub fn host(&self, file: &str, ip: std::net::IpAddr, spiffe: &str) -> Pair {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        p.subject_alt_names.push(SanType::IpAddress(ip));
        p.subject_alt_names
            .push(SanType::URI(spiffe.try_into().unwrap()));
        p.distinguished_name.push(DnType::CommonName, file);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue(file, p)
    }

    /// A client certificate with SPIFFE ID `spiffe` (if any), expired if `expired`.
    pub fn client(&self, file: &str, spiffe: Option<&str>, expired: bool) -> Pair {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        if let Some(id) = spiffe {
            p.subject_alt_names
                .push(SanType::URI(id.try_into().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, file);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            let now = time::OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::days(30);
            p.not_after = now - time::Duration::days(1);
        }
        self.issue(file, p)
    }

    fn issue(&self, file: &str, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let issuer: &rcgen::Issuer<'_, KeyPair> = &self.ca;
        let cert = params.signed_by(&key, issuer).unwrap();
        let pair = Pair {
            cert: self.dir.path().join(format!("{file}.pem")),
            key: self.dir.path().join(format!("{file}.key")),
        };
        // Written to a temporary name and renamed, as SPIRE's agent does: a reader never sees
        // half a file.
        for (path, text) in [(&pair.key, key.serialize_pem()), (&pair.cert, cert.pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        pair
    }
}
