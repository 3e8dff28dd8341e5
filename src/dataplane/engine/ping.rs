//! `tinyscale ping` rounds: each CLI ping sends one disco ping per candidate path (UDP addresses
//! and the DERP region), and the first pong to any of them answers the round; the others are
//! then moot. A round without a pong within [`PING_TIMEOUT`] answers with an error.
//!
//! The bookkeeping ([`Pings`]) takes the time as an argument; the engine sends the pings and
//! feeds it the pongs and its timer ticks.

use std::{collections::HashMap, time::Duration};

use tokio::{sync::oneshot, time::Instant};

use super::{new_tx, Engine, PingResult};
use crate::{
    dataplane::magicsock::endpoint::{Path, TxId},
    wire::keys::NodePublic,
};

/// How long a CLI ping waits for its first pong (Go `pingTimeoutDuration`, 5 s).
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a round's answer goes.
type Reply = oneshot::Sender<Result<PingResult, String>>;

/// One `tinyscale ping` round: the first pong to any of its pings answers it.
struct PendingPing {
    reply: Reply,
    deadline: Instant,
}

/// The CLI ping rounds in flight.
#[derive(Default)]
pub(super) struct Pings {
    /// The round each disco ping of ours belongs to.
    by_tx: HashMap<TxId, u64>,
    rounds: HashMap<u64, PendingPing>,
    /// The last round number handed out.
    round: u64,
}

impl Pings {
    /// Starts a round of the pings `txs`, answered on `reply` by the first pong or, at
    /// `now + PING_TIMEOUT`, with an error.
    pub(super) fn start(&mut self, txs: Vec<TxId>, reply: Reply, now: Instant) {
        self.round += 1;
        let round = self.round;
        for t in txs {
            self.by_tx.insert(t, round);
        }
        self.rounds.insert(
            round,
            PendingPing {
                reply,
                deadline: now + PING_TIMEOUT,
            },
        );
    }

    /// A pong for our ping `tx` came back over `to` after `rtt`: answers its round, if the
    /// ping was a CLI ping whose round is still open.
    pub(super) fn handle_pong(&mut self, tx: &TxId, to: Path, rtt: Duration) {
        let Some(round) = self.by_tx.remove(tx) else { return };
        let (via, direct) = match to {
            Path::Udp(a) => (a.to_string(), true),
            Path::Derp(r) => (format!("DERP({r})"), false),
        };
        // Other pings of the same round are now moot.
        self.by_tx.retain(|_, r| *r != round);
        if let Some(pp) = self.rounds.remove(&round) {
            let _ = pp.reply.send(Ok(PingResult { via, direct, rtt }));
        }
    }

    /// Answers the rounds whose deadline is past `now` with an error.
    pub(super) fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<u64> = self
            .rounds
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(r, _)| *r)
            .collect();
        for r in expired {
            self.by_tx.retain(|_, x| *x != r);
            if let Some(p) = self.rounds.remove(&r) {
                let _ = p.reply.send(Err(format!("no pong within {}s", PING_TIMEOUT.as_secs())));
            }
        }
    }
}

impl Engine {
    /// Sends one ping round to `peer` (every path its endpoint would try) for the CLI.
    pub(super) fn start_ping(&mut self, peer: NodePublic, reply: Reply) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&peer) else {
            let _ = reply.send(Err("no such peer in the netmap".into()));
            return;
        };
        let mut txs = Vec::new();
        let outs = p.endpoint.ping_cli(now.into_std(), &mut || {
            let t = new_tx();
            txs.push(t);
            t
        });
        if outs.is_empty() {
            let _ = reply.send(Err("peer has no DERP region and no known endpoints".into()));
            return;
        }
        self.pings.start(txs, reply, now);
        for o in outs {
            self.send_disco(peer, o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first pong answers its round and retires its sibling pings; a round nobody
    /// answers gets an error at its deadline, not before.
    #[tokio::test(start_paused = true)]
    async fn first_pong_answers_and_silence_times_out() {
        let mut p = Pings::default();
        let t0 = Instant::now();
        let (tx_a, rx_a) = oneshot::channel();
        p.start(vec![[1; 12], [2; 12]], tx_a, t0);
        let (tx_b, mut rx_b) = oneshot::channel();
        p.start(vec![[3; 12]], tx_b, t0);
        p.handle_pong(&[2; 12], Path::Derp(7), Duration::from_millis(30));
        let got = rx_a.await.unwrap().unwrap();
        assert_eq!(
            (got.via.as_str(), got.direct, got.rtt.as_millis()),
            ("DERP(7)", false, 30)
        );
        assert!(!p.by_tx.contains_key(&[1; 12]), "the sibling ping is moot");
        // A late pong of the answered round and an unknown pong change nothing.
        p.handle_pong(&[1; 12], Path::Udp("192.0.2.1:41641".parse().unwrap()), Duration::ZERO);
        p.handle_pong(&[9; 12], Path::Derp(1), Duration::ZERO);
        p.handle_timeout(t0 + PING_TIMEOUT - Duration::from_millis(1));
        assert!(rx_b.try_recv().is_err(), "still waiting before the deadline");
        p.handle_timeout(t0 + PING_TIMEOUT);
        assert_eq!(rx_b.await.unwrap().unwrap_err(), "no pong within 5s");
        assert!(p.rounds.is_empty() && p.by_tx.is_empty());
    }

    #[test]
    fn a_udp_pong_is_direct() {
        let mut p = Pings::default();
        let (tx, mut rx) = oneshot::channel();
        p.start(vec![[1; 12]], tx, Instant::now());
        p.handle_pong(
            &[1; 12],
            Path::Udp("192.0.2.1:41641".parse().unwrap()),
            Duration::from_millis(2),
        );
        let got = rx.try_recv().unwrap().unwrap();
        assert_eq!((got.via.as_str(), got.direct), ("192.0.2.1:41641", true));
    }
}
