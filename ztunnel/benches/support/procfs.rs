//! The proxy processes the benchmarks run: what they read about them from /proc (resident memory,
//! CPU time), and where the baselines' programs are installed. Shared by the ztunnel and waypoint
//! benchmarks, which include this file.

#![allow(dead_code, unreachable_pub)] // each benchmark uses part of it

use std::path::{Path, PathBuf};
use std::time::Duration;

/// `pid`'s CPU time so far, user and system, over all its threads, living and exited; zero if
/// the process is gone.
///
/// Read from the process's CPU-time clock, exact to the nanosecond, not from `/proc/<pid>/stat`,
/// whose 10 ms ticks are 2 µs per request over a 5,000-request phase: coarser than the
/// differences the benchmarks look for.
pub fn cpu(pid: u32) -> Duration {
    use nix::time::{ClockId, clock_getcpuclockid, clock_gettime};
    clock_getcpuclockid(nix::unistd::Pid::from_raw(pid as i32))
        .and_then(|clock: ClockId| clock_gettime(clock))
        .map_or(Duration::ZERO, |t| {
            Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
        })
}

/// `pid`'s resident set in bytes; zero if the process is gone.
pub fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A baseline program (nginx, haproxy) where Debian and local installs put it.
pub fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}
