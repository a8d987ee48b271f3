//! Deploy files that run: every Kubernetes manifest validated against
//! Kubernetes' schemas (strict), the image's layout started as the image's
//! unprivileged user with a read-only root and a writable volume, and the
//! Dockerfile's build context and dependency layer.
//!
//! No container engine: the image's final stage is read from
//! `deploy/Dockerfile` and laid out in a temporary directory, which a private
//! mount namespace makes read-only except for the image's volumes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use portcullis::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn kubernetes_manifests_are_valid_against_kubernetes_schemas() {
    let dir = Path::new(ROOT).join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "the Grafana and PMM manifests: {files:?}");
    let configs = tempfile::tempdir().unwrap();
    let output = std::process::Command::new("python3")
        .arg(Path::new(ROOT).join("deploy/check-manifests.py"))
        .arg("--configs-out")
        .arg(configs.path())
        .args(&files)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run python3 ({e}): validating the manifests needs Python 3 with kubernetes-validate \
                 (`python3 -m pip install kubernetes-validate`, as .ci/run does)"
            )
        });
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(3) => panic!(
            "kubernetes-validate is not installed, so the manifests cannot be validated: {stderr}\
             install it with `python3 -m pip install kubernetes-validate` (.ci/run does)"
        ),
        _ => panic!("deploy/kubernetes does not pass deploy/check-manifests.py:\n{stderr}"),
    }
    eprintln!("{}", String::from_utf8_lossy(&output.stdout).trim());
    // Every gateway.toml in a ConfigMap is a config the gateway loads.
    let mut loaded = 0;
    for entry in std::fs::read_dir(configs.path()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        if let Err(e) = Config::from_toml(&text) {
            panic!("{}: the gateway refuses this config: {e}", path.display());
        }
        loaded += 1;
    }
    assert_eq!(loaded, files.len(), "one gateway.toml per manifest");
}

/// The final stage of `deploy/Dockerfile`, as far as the layout goes.
#[derive(Debug, Default)]
struct Image {
    uid: u32,
    gid: u32,
    workdir: String,
    volumes: Vec<String>,
    /// (source in the build context or stage, destination)
    copies: Vec<(String, String)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                if let Some((op, rest)) = current.trim().split_once(char::is_whitespace) {
                    out.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
                }
                current.clear();
            }
        }
    }
    out
}

fn json_or_words(rest: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|_| rest.split_whitespace().map(str::to_owned).collect())
}

fn read_image() -> Image {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/Dockerfile")).unwrap();
    let all = instructions(&text);
    let last_from = all.iter().rposition(|(op, _)| op == "FROM").expect("a FROM");
    let mut image = Image {
        uid: 0,
        gid: 0,
        workdir: "/".into(),
        ..Image::default()
    };
    for (op, rest) in &all[last_from + 1..] {
        match op.as_str() {
            "USER" => {
                let (u, g) = rest.split_once(':').unwrap_or((rest, rest));
                image.uid = u.parse().expect("USER as a numeric uid");
                image.gid = g.parse().expect("USER as a numeric gid");
            }
            "WORKDIR" => image.workdir = rest.clone(),
            "VOLUME" => image.volumes.extend(json_or_words(rest)),
            "COPY" => {
                let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                let (dest, sources) = words.split_last().expect("COPY SRC DEST");
                for source in sources {
                    image.copies.push((source.to_string(), dest.to_string()));
                }
            }
            "ENTRYPOINT" => image.entrypoint = json_or_words(rest),
            "CMD" => image.cmd = json_or_words(rest),
            _ => {}
        }
    }
    image
}

#[test]
fn the_dockerfile_builds_from_what_dockerignore_lets_in() {
    let text = std::fs::read_to_string(Path::new(ROOT).join(".dockerignore")).expect(".dockerignore");
    let patterns: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        patterns.first(),
        Some(&"*"),
        "an allow-list: everything out, then what the build needs"
    );
    let allowed = |path: &str| {
        patterns[1..].iter().any(|p| {
            let p = p
                .strip_prefix('!')
                .expect("only ! patterns after *")
                .trim_end_matches('/');
            path == p || path.starts_with(&format!("{p}/"))
        })
    };
    for kept_out in [
        "target",
        ".git",
        "certs/gateway.key",
        "bench/out",
        "tests/it/config.rs",
    ] {
        assert!(!allowed(kept_out), "{kept_out} is sent to the build");
    }
    // Every COPY from the context names files that are sent and exist.
    let dockerfile = std::fs::read_to_string(Path::new(ROOT).join("deploy/Dockerfile")).unwrap();
    let mut copies = 0;
    for (op, rest) in instructions(&dockerfile) {
        if op != "COPY" || rest.contains("--from") {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        for source in &words[..words.len() - 1] {
            let source = source.trim_start_matches("./");
            let source = if source == "." { "" } else { source };
            assert!(
                source.is_empty() || allowed(source),
                "COPY {source}: kept out by .dockerignore"
            );
            assert!(
                Path::new(ROOT).join(source).exists(),
                "COPY {source}: not in the repository"
            );
            copies += 1;
        }
    }
    assert!(copies >= 4, "manifests, lock file, sources, config");
}

/// The dependency layer builds the workspace with placeholder sources: the
/// manifests copied before it must load that way (checked with `cargo tree`,
/// which resolves the workspace against the lock file, for this platform,
/// without compiling).
#[test]
fn the_dockerfiles_dependency_layer_loads_the_workspace() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("deploy/Dockerfile")).unwrap();
    let all = instructions(&text);
    let build: Vec<_> = all
        .iter()
        .take_while(|(op, rest)| op != "FROM" || rest.contains(" AS build"))
        .collect();
    let first_run = build
        .iter()
        .position(|(op, _)| op == "RUN")
        .expect("a RUN in the build stage");
    let dir = tempfile::tempdir().unwrap();
    for (op, rest) in &build[..first_run] {
        if op != "COPY" {
            continue;
        }
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (dest, sources) = words.split_last().unwrap();
        for source in sources {
            let to = if dest.ends_with('/') || *dest == "./" {
                dir.path().join(dest).join(Path::new(source).file_name().unwrap())
            } else {
                dir.path().join(dest)
            };
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(Path::new(ROOT).join(source), &to).unwrap();
        }
    }
    let run = &build[first_run].1;
    let build_command = "cargo build --release --locked --bin portcullis";
    assert!(
        run.contains(build_command),
        "the dependency layer's command changed ({run}); update this test"
    );
    let script = run.replace(
        build_command,
        "cargo tree --locked --offline -e normal,build -p portcullis >/dev/null",
    );
    let output = std::process::Command::new("sh")
        .args(["-ec", &script])
        .current_dir(dir.path())
        .env("CARGO_TARGET_DIR", dir.path().join("target"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "the dependency layer does not load the workspace:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Lays the image out under `root` (root-owned and not writable for the
/// image's user, except its volumes, which the user owns).
fn lay_out(image: &Image, root: &Path) -> (PathBuf, PathBuf) {
    let inside = |p: &str| root.join(p.trim_start_matches('/'));
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = image.entrypoint.first().expect("an ENTRYPOINT naming the binary");
    let (_, binary_copy) = image
        .copies
        .iter()
        .find(|(_, dest)| dest == binary)
        .expect("the ENTRYPOINT's binary is copied into the image");
    let config_index = image
        .cmd
        .iter()
        .position(|a| a == "--config")
        .expect("--config in CMD");
    let config = &image.cmd[config_index + 1];
    let (config_source, _) = image
        .copies
        .iter()
        .find(|(_, dest)| dest == config)
        .expect("the config CMD names is copied into the image");
    for (from, to, mode) in [
        (
            Path::new(support::binary::BIN).to_owned(),
            inside(binary_copy),
            0o755,
        ),
        (Path::new(ROOT).join(config_source), inside(config), 0o644),
    ] {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    for volume in &image.volumes {
        let dir = inside(volume);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(image.uid), Some(image.gid)).unwrap();
    }
    std::fs::create_dir_all(inside(&image.workdir)).unwrap();
    // Every directory on the way is root's and 0755.
    for dir in walk_dirs(root) {
        if !image.volumes.iter().any(|v| dir.starts_with(inside(v))) {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    (inside(binary), inside(config))
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_owned()];
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk_dirs(&path));
        }
    }
    out
}

/// Starts `binary` in a private mount namespace where `root` is read-only
/// and the volumes writable, as `uid:gid` with no other group and no way to
/// gain privileges, from `workdir`.
fn start_in_layout(
    image: &Image,
    root: &Path,
    binary: &Path,
    config: &Path,
    workdir: &Path,
) -> tokio::process::Child {
    let mut script =
        String::from("set -e\nmount --bind \"$ROOT\" \"$ROOT\"\nmount -o remount,bind,ro \"$ROOT\"\n");
    for volume in &image.volumes {
        let dir = root.join(volume.trim_start_matches('/'));
        script.push_str(&format!(
            "mount --bind '{0}' '{0}'\nmount -o remount,bind,rw '{0}'\n",
            dir.display()
        ));
    }
    // cd after the mounts: a working directory taken before them would
    // still be on the writable mount underneath.
    script.push_str(&format!(
        "cd \"$WORKDIR\"\nexec setpriv --reuid={} --regid={} --clear-groups --no-new-privs -- \
         \"$BINARY\" --config \"$CONFIG\" run\n",
        image.uid, image.gid
    ));
    let mut command = tokio::process::Command::new("unshare");
    for (key, _) in std::env::vars() {
        if key.starts_with("PORTCULLIS_") {
            command.env_remove(key);
        }
    }
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &script])
        .env("ROOT", root)
        .env("WORKDIR", workdir)
        .env("BINARY", binary)
        .env("CONFIG", config)
        // An operator's overrides: loopback ports, JSON logs to read the
        // listening line, an upstream that is not there (start does not need it).
        .env("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_SERVER_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .env("PORTCULLIS_UPSTREAM_URL", "http://127.0.0.1:9")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run unshare (util-linux) to lay out a read-only root: {e}"))
}

/// Reads stderr until the listening line (its address) or the end (the
/// lines so far). Past the listening line stderr is drained in the
/// background: a closed pipe would fail the process's next log line.
async fn listening(child: &mut tokio::process::Child) -> Result<String, String> {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                if event["message"] == "portcullis listening" {
                    return event["addr"].as_str().map(str::to_owned);
                }
            }
            seen.push(line);
        }
        None
    })
    .await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match found {
        Ok(Some(addr)) => Ok(addr),
        _ => Err(seen.join("\n")),
    }
}

#[tokio::test]
async fn the_image_layout_starts_as_its_unprivileged_user_on_a_read_only_root() {
    let image = read_image();
    assert_ne!(image.uid, 0, "the image runs as root: {image:?}");
    assert!(
        image.volumes.iter().any(|v| Path::new(&image.workdir).starts_with(v)),
        "WORKDIR {} is not on a VOLUME {:?}: with a read-only root the generated certificate has nowhere to go",
        image.workdir,
        image.volumes
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let (binary, config) = lay_out(&image, &root);
    let workdir = root.join(image.workdir.trim_start_matches('/'));

    let mut child = start_in_layout(&image, &root, &binary, &config, &workdir);
    let addr = match listening(&mut child).await {
        Ok(addr) => addr,
        Err(log) => panic!(
            "the image's binary did not start as {}:{} with a read-only root:\n{log}\nexit: {:?}",
            image.uid,
            image.gid,
            child.try_wait()
        ),
    };
    // It serves TLS with the pair it generated in its volume (a request
    // without a credential: 401 from the gateway itself).
    let (status, body) = support::curl(&[&format!("https://{addr}/api/user")]).await;
    assert_eq!(status, 401, "{body}");
    for name in ["certs/gateway.crt", "certs/gateway.key"] {
        let meta = std::fs::metadata(workdir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), image.uid, "{name}");
    }
    let pid = child.id().unwrap() as i32;
    // SAFETY: kill(2) on our own child (unshare exec'd sh exec'd setpriv exec'd portcullis: one pid).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");

    // The same start from a working directory on the read-only root (the
    // image before: WORKDIR root's, no volume) fails, and says why.
    let config_dir = config.parent().unwrap().to_owned();
    let mut child = start_in_layout(&image, &root, &binary, &config, &config_dir);
    let log = match listening(&mut child).await {
        Ok(_) => panic!("started with nowhere to write its certificate"),
        Err(log) => log,
    };
    assert!(!child.wait().await.unwrap().success());
    assert!(
        log.contains("tls.cert") && log.contains("cannot be written"),
        "{log}"
    );
}

/// A log collector that goes away (stderr a closed pipe) does not take the
/// gateway down: the lines are lost, the requests are served.
#[tokio::test]
async fn a_closed_log_pipe_does_not_stop_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = support::binary::command()
        .args(["run"])
        .current_dir(dir.path())
        .env("PORTCULLIS_SERVER_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_SERVER_ADMIN_LISTEN", "127.0.0.1:0")
        .env("PORTCULLIS_LOG_FORMAT", "json")
        .env("PORTCULLIS_UPSTREAM_URL", "http://127.0.0.1:9")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) {
                if event["message"] == "portcullis listening" {
                    return event["addr"].as_str().map(str::to_owned);
                }
            }
        }
        None
    })
    .await
    .expect("listening in time")
    .expect("a listening line");
    drop(lines);
    for _ in 0..3 {
        let (status, body) = support::curl(&[&format!("https://{addr}/api/user")]).await;
        assert_eq!(status, 401, "{body}");
    }
    assert!(child.try_wait().unwrap().is_none(), "the gateway exited");
    child.kill().await.unwrap();
}
