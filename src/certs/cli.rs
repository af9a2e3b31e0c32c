//! `kvinject certs`: a CA and a serving certificate as files, for installs that bring their
//! own certificates (`tls.source=secret` in the chart). The CA key is not kept: nothing can
//! issue more certificates under this CA, and renewing means running the command again.

use super::{Lifetimes, SubjectNames, generate};
use crate::config::CertsArgs;
use anyhow::{Context, bail};
use base64::Engine;
use std::{io::Write, os::unix::fs::OpenOptionsExt, path::Path};
use time::OffsetDateTime;

/// `kvinject certs`: writes the files and prints the caBundle on stdout (hints on stderr).
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let names = SubjectNames::for_service(&args.service, &args.namespace, &args.extra_sans)?;
    let lifetimes = Lifetimes {
        serving: args.validity,
        ca: args.validity.max(Lifetimes::default().ca),
    };
    let bundle = write(&args.out_dir, &names, lifetimes, args.force)?;
    let dir = args.out_dir.display();
    eprintln!(
        "wrote {dir}/ca.crt, {dir}/tls.crt and {dir}/tls.key for {}",
        names
            .dns
            .iter()
            .cloned()
            .chain(names.ips.iter().map(|i| i.to_string()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "next: kubectl -n {} create secret tls kvinject-tls --cert={dir}/tls.crt --key={dir}/tls.key",
        args.namespace
    );
    eprintln!(
        "      helm ... --set tls.source=secret --set tls.secretName=kvinject-tls --set tls.caBundle=<the line below>"
    );
    println!("{bundle}");
    Ok(())
}

pub const FILES: [&str; 3] = ["ca.crt", "tls.crt", "tls.key"];

/// Writes ca.crt, tls.crt and tls.key into `dir` and returns the caBundle (base64 of
/// ca.crt). Either all three files are written or none is changed.
pub fn write(dir: &Path, names: &SubjectNames, lifetimes: Lifetimes, force: bool) -> anyhow::Result<String> {
    if !dir.is_dir() {
        bail!("--out-dir {}: not a directory", dir.display());
    }
    if !force {
        let existing: Vec<_> = FILES
            .iter()
            .filter(|f| dir.join(f).exists())
            .map(|f| dir.join(f).display().to_string())
            .collect();
        if !existing.is_empty() {
            bail!(
                "{} already exist(s); pass --force to replace",
                existing.join(", ")
            );
        }
    }
    let m = generate(names, OffsetDateTime::now_utc(), lifetimes)?;
    let contents = [
        (FILES[0], &m.ca_bundle, 0o644),
        (FILES[1], &m.cert, 0o644),
        (FILES[2], &m.key, 0o600),
    ];
    // Stage every file first, then rename: a failure leaves the directory as it was.
    let staged: Vec<_> = contents
        .iter()
        .map(|(name, body, mode)| {
            let tmp = dir.join(format!(".{name}.kvinject-tmp"));
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(*mode)
                .open(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(body.as_bytes())
                .and_then(|_| f.sync_all())
                .with_context(|| format!("writing {}", tmp.display()))?;
            Ok((tmp, dir.join(name)))
        })
        .collect::<anyhow::Result<_>>()
        .inspect_err(|_| cleanup(dir))?;
    for (tmp, dst) in staged {
        std::fs::rename(&tmp, &dst).with_context(|| format!("moving {} into place", dst.display()))?;
    }
    Ok(base64::engine::general_purpose::STANDARD.encode(&m.ca_bundle))
}

fn cleanup(dir: &Path) {
    for name in FILES {
        let _ = std::fs::remove_file(dir.join(format!(".{name}.kvinject-tmp")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_three_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let names = SubjectNames::for_service("kvinject", "platform", &[]).unwrap();
        let bundle = write(dir.path(), &names, Lifetimes::default(), false).unwrap();
        let ca = std::fs::read_to_string(dir.path().join("ca.crt")).unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD.decode(&bundle).unwrap(),
            ca.as_bytes()
        );
        let key_mode = std::fs::metadata(dir.path().join("tls.key"))
            .unwrap()
            .permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777, 0o600);
        let before = std::fs::read(dir.path().join("tls.crt")).unwrap();

        let err = write(dir.path(), &names, Lifetimes::default(), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exist") && err.contains("--force"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("tls.crt")).unwrap(),
            before,
            "refusal changed a file"
        );

        write(dir.path(), &names, Lifetimes::default(), true).unwrap();
        assert_ne!(std::fs::read(dir.path().join("tls.crt")).unwrap(), before);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with("kvinject-tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }

    #[test]
    fn missing_directory_is_named() {
        let names = SubjectNames::for_service("kvinject", "platform", &[]).unwrap();
        let err = write(
            Path::new("/nonexistent/kvinject"),
            &names,
            Lifetimes::default(),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/nonexistent/kvinject") && err.contains("not a directory"),
            "{err}"
        );
    }
}
