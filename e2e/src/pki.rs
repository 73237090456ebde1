//! Test certificates, made with the `openssl` command (as `e2e/cluster/pki.sh` makes the
//! cluster's): P-256 keys, valid for a day, written as `<name>.crt` and `<name>.key` in a
//! directory of the test's own.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Runs `openssl args` in `dir`, failing with its stderr.
pub fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A self-signed CA `name` with common name `cn`.
pub fn ca(dir: &Path, name: &str, cn: &str) -> Result<()> {
    let (key, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let mut args = vec!["req", "-x509"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &crt, "-subj", &subj, "-days", "1"]);
    openssl(dir, &args)
}

/// A certificate `name` with common name `cn`, signed by the CA `ca` (made by [`ca`]), with
/// the X.509 extensions `ext` (openssl's extfile syntax, e.g.
/// `subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n`).
pub fn leaf(dir: &Path, name: &str, ca: &str, cn: &str, ext: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    let (key, csr, crt, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
        format!("/CN={cn}"),
    );
    let mut args = vec!["req"];
    args.extend(EC);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
    openssl(dir, &args)?;
    let (ca_crt, ca_key, extfile) = (
        format!("{ca}.crt"),
        format!("{ca}.key"),
        format!("{name}.ext"),
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "1",
            "-extfile",
            &extfile,
        ],
    )
}

/// The extensions of a server certificate for `san` (e.g. `DNS:x.ns.svc,IP:127.0.0.1`).
pub fn server_ext(san: &str) -> String {
    format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n")
}
