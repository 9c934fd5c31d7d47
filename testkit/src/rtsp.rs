//! A real RTSP server for tests: GStreamer's gst-rtsp-server through `scripts/rtsp-server`,
//! streaming the real street clip in real time. Shared by the agent's tests and the end-to-end
//! tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The project's root directory.
pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running server, killed (SIGKILL) when dropped.
pub struct RtspServer(Child);

impl RtspServer {
    /// Serves `media/vtest-street-768x576-10fps.mp4` at `rtsp://127.0.0.1:{port}/street` and
    /// returns once the server listens.
    pub fn start(port: u16) -> Self {
        Self::serve(port, &project_root().join("media/vtest-street-768x576-10fps.mp4"))
    }

    /// Serves `file` (MP4 or MPEG-TS) at `rtsp://127.0.0.1:{port}/street`.
    pub fn serve(port: u16, file: &Path) -> Self {
        let root = project_root();
        let mut child = Command::new("/usr/bin/python3")
            .arg(root.join("scripts/rtsp-server"))
            .args(["--port", &port.to_string(), "--path", "/street"])
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting scripts/rtsp-server (needs python3-gi and gst-rtsp-server: scripts/setup-test-peers)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read");
        assert!(line.starts_with("ready"), "RTSP server did not start: {line:?}");
        Self(child)
    }

    /// SIGSTOP: the server keeps its connections open but sends nothing (a frozen camera).
    pub fn freeze(&self) {
        let _ = Command::new("kill").arg("-STOP").arg(self.0.id().to_string()).status();
    }

    /// SIGCONT after `freeze`.
    pub fn thaw(&self) {
        let _ = Command::new("kill").arg("-CONT").arg(self.0.id().to_string()).status();
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP port free at the time of the call.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}
