//! The S3 side of the integration tests: the suite's shared SeaweedFS server (started by
//! scripts/test.sh, which exports DISKKIT_TEST_S3_ENDPOINT), servers of a test's own, and diskkit
//! runs with their own cache directory and S3 settings.

use super::{diskkit_bin, tempdir};
use diskkit::storage::Settings;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const ACCESS_KEY: &str = "diskkittest";
pub const SECRET_KEY: &str = "diskkittestsecret";

/// A diskkit invocation with its own checkpoint directory and S3 settings.
pub struct Env {
    pub cache: PathBuf,
    pub endpoint: Option<String>,
}

impl Env {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(diskkit_bin());
        cmd.args(args)
            .env("XDG_CACHE_HOME", &self.cache)
            .env("XDG_CONFIG_HOME", &self.cache)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_SESSION_TOKEN");
        match &self.endpoint {
            Some(e) => cmd.env("AWS_ENDPOINT_URL", e),
            None => cmd.env_remove("AWS_ENDPOINT_URL"),
        };
        cmd
    }

    pub fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.command(args).output().expect("run diskkit");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.run(args);
        assert_eq!(code, 0, "diskkit {args:?} failed:\n{out}\n{err}");
        out
    }

    /// Completed parts recorded in the (only) checkpoint.
    pub fn checkpoint_parts(&self) -> usize {
        let dir = self.cache.join("diskkit/uploads");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return 0;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "json")
                && let Ok(text) = std::fs::read_to_string(e.path())
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                return v["parts"].as_object().map_or(0, |p| p.len());
            }
        }
        0
    }

    /// Points the (only) checkpoint at an upload the server does not have, as when the server
    /// expired or aborted it.
    pub fn forget_upload_on_server(&self) {
        let dir = self.cache.join("diskkit/uploads");
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "json") {
                let text = std::fs::read_to_string(e.path()).unwrap();
                let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
                v["upload_id"] = "gone-on-the-server".into();
                std::fs::write(e.path(), v.to_string()).unwrap();
                return;
            }
        }
        panic!("no checkpoint in {}", dir.display());
    }
}

/// The S3 endpoint of the shared test server, or `None` (with the reason printed) outside CI.
pub fn shared_server() -> Option<String> {
    match std::env::var("DISKKIT_TEST_S3_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "DISKKIT_TEST_S3_ENDPOINT is not set: run the tests through scripts/test.sh, \
                 which starts the S3 test server"
            );
            eprintln!("skipped: no S3 test server (run scripts/test.sh to start one)");
            None
        }
    }
}

/// A temporary directory and an environment that talks to the shared server.
pub fn shared_server_env() -> Option<(tempfile::TempDir, Env)> {
    let endpoint = shared_server()?;
    let dir = tempdir();
    let env = Env {
        cache: dir.path().join("cache"),
        endpoint: Some(endpoint),
    };
    Some((dir, env))
}

/// A temporary directory with a local bucket directory in it, and an environment for it.
pub fn local_bucket_env() -> (tempfile::TempDir, PathBuf, Env) {
    let dir = tempdir();
    let bucket = dir.path().join("bucket");
    std::fs::create_dir(&bucket).unwrap();
    let env = Env {
        cache: dir.path().join("cache"),
        endpoint: None,
    };
    (dir, bucket, env)
}

/// A SeaweedFS server of this test's own, to stop and restart midway.
pub struct Server {
    pub dir: PathBuf,
    base: u16,
    child: Child,
}

impl Server {
    pub fn start(dir: &Path, base: u16) -> Server {
        let child = Command::new("weed")
            .args([
                "mini",
                &format!("-dir={}", dir.display()),
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                &format!("-master.port={}", base),
                &format!("-volume.port={}", base + 1),
                &format!("-filer.port={}", base + 2),
                &format!("-s3.port={}", base + 3),
                &format!("-webdav.port={}", base + 4),
                &format!("-admin.port={}", base + 5),
                "-admin.ui=false",
                "-master.telemetry=false",
                "-bucket=diskkit-test",
            ])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed");
        let server = Server {
            dir: dir.to_path_buf(),
            base,
            child,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", base + 3)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "weed did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.base + 3)
    }

    pub fn stop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connection settings of the shared test server, for the library's own calls.
pub fn s3_settings(endpoint: &str) -> Settings {
    Settings {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        access_key_id: Some(ACCESS_KEY.into()),
        secret_access_key: Some(SECRET_KEY.into()),
        ..Settings::default()
    }
}
