//! The gossip transport against what an outsider can send: oversized, garbage and replayed
//! datagrams, stalled and oversized TCP frames, and too many connections. Each test runs a
//! real member on 127.0.0.1 and waits on its counters, never on sleeps.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use sluice_gossip::clock::wall_ms;
use sluice_gossip::runtime::HEADER_TIMEOUT;
use sluice_gossip::testing::{eventually, state_of};
use sluice_gossip::wire::{self, Kind, Stamp};
use sluice_gossip::{
    generate_key, Cluster, ClusterConfig, ClusterHandle, Keyring, NodeMeta, Profile, Role, Stats,
    TransportConfig,
};

async fn member(key: &str, transport: TransportConfig) -> ClusterHandle {
    let mut c = ClusterConfig::new("transport-test", "127.0.0.1:0".parse().unwrap(), key);
    c.profile = Profile::Local;
    c.transport = transport;
    Cluster::start(c, NodeMeta::new("target", Role::Proxy))
        .await
        .expect("starts")
}

// Waits (at most `secs` seconds) until the member's counters satisfy `cond`; returns them.
async fn until(h: &ClusterHandle, secs: u64, what: &str, cond: impl Fn(&Stats) -> bool) -> Stats {
    eventually(secs, what, || cond(&h.stats())).await;
    h.stats()
}

fn now_s() -> u32 {
    (wall_ms() / 1000) as u32
}

async fn udp_to(addr: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.connect(addr).await.unwrap();
    s
}

// Whether the peer closed the connection within `secs` (EOF or reset; never data).
async fn closed_within(stream: &mut TcpStream, secs: u64) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(secs), stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn oversized_and_garbage_datagrams_are_dropped_before_parsing_and_counted() {
    let transport = TransportConfig {
        udp_payload_size: 1200,
        ..TransportConfig::default()
    };
    let h = member(&generate_key(), transport).await;
    let udp = udp_to(h.gossip_addr()).await;

    // One byte over the largest allowed size: dropped before any decryption, whatever this
    // member sends itself.
    udp.send(&vec![0u8; wire::MAX_UDP_PAYLOAD + 1])
        .await
        .unwrap();
    udp.send(&vec![0u8; 60_000]).await.unwrap();
    let s = until(&h, 10, "two oversized datagrams", |s| s.udp_oversized == 2).await;
    assert_eq!(s.rejected_decrypt, 0, "{s:?}");

    // Random bytes of a valid size fail authentication; so does an empty datagram.
    for len in [0, 1, 29, 500, 1201] {
        let noise: Vec<u8> = (0..len).map(|_| rand::random::<u8>()).collect();
        udp.send(&noise).await.unwrap();
    }
    let s = until(&h, 10, "five garbage datagrams", |s| {
        s.rejected_decrypt == 5
    })
    .await;
    assert_eq!((s.udp_oversized, s.malformed), (2, 0), "{s:?}");
}

#[tokio::test]
async fn datagrams_larger_than_the_own_setting_are_accepted_so_it_can_change_node_by_node() {
    let key = generate_key();
    let transport = TransportConfig {
        udp_payload_size: 1024,
        ..TransportConfig::default()
    };
    let h = member(&key, transport).await;
    let ring = Keyring::from_base64(&[key]).unwrap();
    let udp = udp_to(h.gossip_addr()).await;
    // A member still at a larger setting sends a datagram of up to the largest size: it is
    // decrypted and accepted (its body is no foca packet, which is the node's business).
    let stamp = Stamp {
        session: rand::random(),
        counter: 1,
        sent_at_s: now_s(),
    };
    let body = vec![1u8; wire::MAX_FOCA_BODY];
    let sealed = wire::seal(&ring, "transport-test", Kind::Foca, stamp, &body, false);
    assert_eq!(sealed.len(), wire::MAX_UDP_PAYLOAD);
    udp.send(&sealed).await.unwrap();
    let s = until(&h, 10, "the large datagram", |s| s.udp_received >= 1).await;
    assert_eq!(
        (
            s.udp_oversized,
            s.rejected_decrypt,
            s.malformed,
            s.oversized_bodies
        ),
        (0, 0, 0, 0),
        "{s:?}"
    );
}

#[tokio::test]
async fn a_replayed_datagram_is_refused_and_counted() {
    let key = generate_key();
    let h = member(&key, TransportConfig::default()).await;
    let ring = Keyring::from_base64(&[key]).unwrap();
    let udp = udp_to(h.gossip_addr()).await;
    let stamp = Stamp {
        session: rand::random(),
        counter: 1,
        sent_at_s: now_s(),
    };
    // A validly sealed message (its body is no foca packet, which is the node's business, not
    // the transport's): accepted once.
    let sealed = wire::seal(&ring, "transport-test", Kind::Foca, stamp, b"x", false);
    udp.send(&sealed).await.unwrap();
    let s = until(&h, 10, "the first copy", |s| s.udp_received >= 1).await;
    assert_eq!((s.rejected_decrypt, s.rejected_replay), (0, 0), "{s:?}");

    // The same bytes again: a replay.
    udp.send(&sealed).await.unwrap();
    until(&h, 10, "the replay refused", |s| s.rejected_replay == 1).await;

    // A fresh counter of the same session passes; a message sealed long ago does not.
    let next = Stamp {
        counter: 2,
        ..stamp
    };
    udp.send(&wire::seal(
        &ring,
        "transport-test",
        Kind::Foca,
        next,
        b"y",
        false,
    ))
    .await
    .unwrap();
    let old = Stamp {
        counter: 3,
        sent_at_s: now_s() - 3600,
        ..stamp
    };
    udp.send(&wire::seal(
        &ring,
        "transport-test",
        Kind::Foca,
        old,
        b"z",
        false,
    ))
    .await
    .unwrap();
    until(&h, 10, "all four datagrams", |s| s.udp_received >= 4).await;
    let s = until(&h, 10, "the old one refused", |s| s.rejected_replay == 2).await;
    assert_eq!((s.rejected_decrypt, s.malformed), (0, 0), "{s:?}");
}

#[tokio::test]
async fn stalled_and_oversized_frames_are_closed_unparsed_without_their_declared_memory() {
    let h = member(&generate_key(), TransportConfig::default()).await;
    let addr = h.gossip_addr();

    // Connects and never sends a length prefix: closed after the header timeout.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut silent, HEADER_TIMEOUT.as_secs() + 10).await);
    until(&h, 10, "the header timeout", |s| s.tcp_timeouts == 1).await;

    // Half a length prefix, then nothing: the same.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0, 0]).await.unwrap();
    assert!(closed_within(&mut half, HEADER_TIMEOUT.as_secs() + 10).await);
    until(&h, 10, "the second header timeout", |s| s.tcp_timeouts == 2).await;

    // A length above the frame limit: refused as soon as it is read.
    let mut huge = TcpStream::connect(addr).await.unwrap();
    huge.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    assert!(closed_within(&mut huge, 10).await);
    until(&h, 10, "the oversized length refused", |s| {
        s.tcp_frames_refused == 1
    })
    .await;

    // 16 MiB declared, 10 bytes sent: only what arrived is buffered (one read chunk), and the
    // connection is closed when the frame does not complete in time.
    let mut liar = TcpStream::connect(addr).await.unwrap();
    liar.write_all(&(wire::MAX_FRAME as u32).to_be_bytes())
        .await
        .unwrap();
    liar.write_all(&[7u8; 10]).await.unwrap();
    let s = until(&h, 10, "the liar's buffer", |s| s.tcp_buffer_bytes > 0).await;
    assert!(s.tcp_buffer_bytes <= 64 * 1024, "{s:?}");
    assert!(closed_within(&mut liar, 30).await);
    let s = until(&h, 10, "the stream timeout", |s| {
        s.tcp_timeouts == 3 && s.tcp_buffer_bytes == 0
    })
    .await;
    // Nothing of all this was ever decrypted or parsed.
    assert_eq!(
        (s.tcp_received, s.rejected_decrypt, s.malformed),
        (0, 0, 0),
        "{s:?}"
    );
}

async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    s.connect(to).await.unwrap()
}

#[tokio::test]
async fn inbound_connections_are_capped_in_all_and_per_address() {
    let transport = TransportConfig {
        tcp_max_connections: 3,
        tcp_max_connections_per_addr: 2,
        ..TransportConfig::default()
    };
    let h = member(&generate_key(), transport).await;
    let addr = h.gossip_addr();

    // A connection that keeps its place while the test goes on: it has sent a frame's length
    // and part of it, so only the stream timeout (not the shorter header timeout) ends it.
    let holding = |ip: &'static str| async move {
        let mut s = connect_from(ip, addr).await;
        s.write_all(&64u32.to_be_bytes()).await.unwrap();
        s.write_all(&[1u8]).await.unwrap();
        s
    };
    // Two from one address are served; the third from it is closed at once.
    let a1 = holding("127.0.0.1").await;
    let a2 = holding("127.0.0.1").await;
    let mut a3 = connect_from("127.0.0.1", addr).await;
    assert!(closed_within(&mut a3, 10).await);
    until(&h, 10, "the per-address refusal", |s| s.tcp_refused == 1).await;

    // Another address still gets the last place in all; a fourth connection does not.
    let b1 = holding("127.0.0.2").await;
    let mut c1 = connect_from("127.0.0.3", addr).await;
    assert!(closed_within(&mut c1, 10).await);
    until(&h, 10, "the global refusal", |s| s.tcp_refused == 2).await;

    // Closing connections gives their places back: a new one is served (its garbage frame
    // reaches decryption).
    drop((a1, a2, b1));
    let mut served = None;
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.1", addr).await;
        s.write_all(&64u32.to_be_bytes()).await.unwrap();
        s.write_all(&[9u8; 64]).await.unwrap();
        if closed_within(&mut s, 10).await && h.stats().rejected_decrypt >= 1 {
            served = Some(());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served.is_some(), "{:?}", h.stats());
    until(&h, 10, "the garbage frame refused", |s| {
        s.rejected_decrypt == 1
    })
    .await;
}

#[tokio::test]
async fn a_ping_sent_over_tcp_is_answered_with_foca_s_ack_and_nothing_else_is() {
    use foca::{Codec, Header, Message, PostcardCodec};
    use sluice_gossip::node::NodeId;

    let key = generate_key();
    let h = member(&key, TransportConfig::default()).await;
    let ring = Keyring::from_base64(&[key]).unwrap();
    let me = h.members().into_iter().find(|m| m.is_self).unwrap();
    let target = NodeId {
        addr: h.gossip_addr(),
        generation: me.generation,
    };
    let prober = NodeId {
        addr: "127.0.0.1:9".parse().unwrap(),
        generation: 1,
    };
    let packet = |message: Message<NodeId>| {
        let mut out = Vec::new();
        let header = Header {
            src: prober.clone(),
            src_incarnation: 0,
            dst: target.clone(),
            message,
        };
        PostcardCodec.encode_header(&header, &mut out).unwrap();
        out
    };
    let session = rand::random();
    let addr = h.gossip_addr();
    let exchange = |counter: u64, body: Vec<u8>| {
        let ring = ring.clone();
        async move {
            let stamp = Stamp {
                session,
                counter,
                sent_at_s: now_s(),
            };
            let sealed = wire::seal(&ring, "transport-test", Kind::Probe, stamp, &body, false);
            let mut s = TcpStream::connect(addr).await.unwrap();
            wire::write_frame(&mut s, &sealed).await.unwrap();
            let reply = tokio::time::timeout(Duration::from_secs(10), wire::read_frame(&mut s))
                .await
                .expect("answered or closed in time");
            reply
                .ok()
                .map(|r| wire::open(&ring, "transport-test", &r, |_| true).unwrap())
        }
    };

    let reply = exchange(1, packet(Message::Ping(7))).await.expect("an ack");
    assert_eq!(reply.kind, Kind::ProbeAck);
    let ack: Header<NodeId> = PostcardCodec.decode_header(&reply.body[..]).unwrap();
    assert_eq!((ack.src, ack.message), (target.clone(), Message::Ack(7)));

    // The probe path answers pings only: any other foca message gets no reply.
    assert_eq!(exchange(2, packet(Message::Ack(7))).await, None);
    assert_eq!(exchange(3, b"not foca".to_vec()).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_datagrams_are_lost_stays_alive_through_the_tcp_fallback_probe() {
    use sluice_gossip::MemberState;
    use tokio::net::TcpListener;

    // B advertises 127.0.0.1:P, where TCP is forwarded to B (bound at 127.0.0.2:P) and UDP
    // goes into a socket nobody reads: every datagram to B is lost, its TCP answers.
    let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let advertised = front.local_addr().unwrap();
    let _black_hole = UdpSocket::bind(advertised).await.unwrap();
    let real: SocketAddr = format!("127.0.0.2:{}", advertised.port()).parse().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = front.accept().await {
            tokio::spawn(async move {
                if let Ok(mut to_b) = TcpStream::connect(real).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut to_b).await;
                }
            });
        }
    });

    let key = generate_key();
    let a = member(&key, TransportConfig::default()).await;
    let mut cb = ClusterConfig::new("transport-test", real, &key);
    cb.profile = Profile::Local;
    cb.advertise_addr = Some(advertised);
    cb.peers = vec![a.gossip_addr().to_string()];
    let b = Cluster::start(cb, NodeMeta::new("b", Role::Backend))
        .await
        .expect("b starts");
    let state_of_b = || state_of(&a, "b");
    eventually(10, "a sees b alive", || {
        state_of_b() == Some(MemberState::Alive)
    })
    .await;

    // A probes B every 200 ms; each UDP ping is lost and answered over TCP. Over twenty such
    // probes B stays alive at A. (Without the fallback every probe of B fails: it is suspect
    // from the first and down within seconds. A loaded machine may miss the odd answer's
    // 140 ms deadline, so a brief suspicion is tolerated; death is not.)
    let start = a.stats().probe_fallback_acks;
    let mut seen = Vec::new();
    for _ in 0..1000 {
        seen.push(state_of_b());
        if a.stats().probe_fallback_acks >= start + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let alive = seen
        .iter()
        .filter(|st| **st == Some(MemberState::Alive))
        .count();
    assert!(
        alive * 10 >= seen.len() * 9 && seen.iter().all(|st| st.is_some_and(|s| s.is_active())),
        "b was alive at a in only {alive} of {} looks (or went down)",
        seen.len()
    );
    let s = a.stats();
    assert!(s.probe_fallback_acks >= start + 20, "{s:?}");
    drop(b);
}

// A frame of `MAX_FRAME` bytes declared from `ip`, of which `sent` arrive: the member's buffer
// for it grows to hold them (doubling), and the connection is held until the stream timeout.
async fn liar(ip: &str, to: SocketAddr, sent: usize) -> TcpStream {
    let mut s = connect_from(ip, to).await;
    s.write_all(&(wire::MAX_FRAME as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&vec![7u8; sent]).await.unwrap();
    s
}

// What a key holder can craft: `n` zeros, deflated as well as deflate can, sealed as `kind`.
fn bomb(ring: &Keyring, kind: Kind, counter: u64, n: usize) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![0u8; n]).unwrap();
    let deflated = enc.finish().unwrap();
    // The envelope's plaintext: kind, flags (version 4, deflated), stamp, body.
    let mut plain = vec![kind as u8, (wire::WIRE_VERSION << 4) | 1];
    plain.extend_from_slice(&SESSION.to_be_bytes());
    plain.extend_from_slice(&counter.to_be_bytes());
    plain.extend_from_slice(&now_s().to_be_bytes());
    plain.extend_from_slice(&deflated);
    ring.seal(&plain, b"transport-test")
}
const SESSION: u64 = 0x5eed;

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_frame_budget_and_replies_have_their_own() {
    let key = generate_key();
    let a = member(&key, TransportConfig::default()).await;
    let b = member(&key, TransportConfig::default()).await;
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    b.blobs().insert([7; 32], blob.clone().into()).unwrap();
    let to = a.gossip_addr();

    // Two 16 MiB buffers from one address (8 MiB sent each, so each doubled to 16 MiB) are
    // that address's whole share: a third frame from it is refused at its first chunk.
    let _l1 = liar("127.0.0.1", to, 8 * MIB as usize).await;
    let _l2 = liar("127.0.0.1", to, 8 * MIB as usize).await;
    until(&a, 10, "32 MiB held for 127.0.0.1", |s| {
        s.tcp_buffer_bytes == 32 * MIB
    })
    .await;
    let mut l3 = liar("127.0.0.1", to, 1024).await;
    assert!(closed_within(&mut l3, 10).await);
    until(&a, 10, "the third frame refused", |s| {
        s.tcp_frames_refused == 1
    })
    .await;

    // Another address still gets its share; together they exhaust the inbound budget.
    let _l4 = liar("127.0.0.2", to, 8 * MIB as usize).await;
    let _l5 = liar("127.0.0.2", to, 8 * MIB as usize).await;
    until(&a, 10, "the inbound budget spent", |s| {
        s.tcp_buffer_bytes == 64 * MIB
    })
    .await;

    // The reply to this member's own request is read within a budget of its own.
    assert_eq!(
        b.fetch_blob(b.gossip_addr(), &[7; 32]).await,
        Ok(blob.clone())
    );
    assert_eq!(a.fetch_blob(b.gossip_addr(), &[7; 32]).await, Ok(blob));
    let s = a.stats();
    assert_eq!((s.tcp_frames_refused, s.tcp_timeouts), (1, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_inflate_only_to_their_kind_s_limit_and_within_the_budget() {
    let key = generate_key();
    let h = member(&key, TransportConfig::default()).await;
    let ring = Keyring::from_base64(&[key]).unwrap();
    let to = h.gossip_addr();

    // A datagram-sized foca packet inflating to 1 MiB, over UDP and over TCP, and a blob
    // request inflating to 64 KiB: refused once past their kinds' limits, and counted.
    let udp = udp_to(to).await;
    let packet = bomb(&ring, Kind::Foca, 1, MIB as usize);
    assert!(packet.len() <= 1400, "{}", packet.len());
    udp.send(&packet).await.unwrap();
    for (counter, kind, n) in [(2, Kind::Foca, MIB as usize), (3, Kind::BlobGet, 65_536)] {
        let mut s = TcpStream::connect(to).await.unwrap();
        wire::write_frame(&mut s, &bomb(&ring, kind, counter, n))
            .await
            .unwrap();
        assert!(closed_within(&mut s, 10).await);
    }
    let s = until(&h, 10, "three oversized bodies", |s| {
        s.oversized_bodies == 3
    })
    .await;
    assert_eq!((s.rejected_decrypt, s.malformed), (0, 0), "{s:?}");

    // With 48 MiB of the inbound budget held, a 16 KiB push-pull frame inflating to 16 MiB
    // is read and opened but refused while it inflates: its body counts in the budget.
    let _l1 = liar("127.0.0.1", to, 8 * MIB as usize).await;
    let _l2 = liar("127.0.0.1", to, 8 * MIB as usize).await;
    let _l3 = liar("127.0.0.2", to, 8 * MIB as usize).await;
    until(&h, 10, "48 MiB held", |s| s.tcp_buffer_bytes == 48 * MIB).await;
    let frame = bomb(&ring, Kind::PushPull, 4, wire::MAX_FRAME);
    assert!(frame.len() < 64 * 1024, "{}", frame.len());
    let mut s = connect_from("127.0.0.3", to).await;
    wire::write_frame(&mut s, &frame).await.unwrap();
    assert!(closed_within(&mut s, 10).await);
    let s = until(&h, 10, "the inflated body refused", |s| {
        s.tcp_frames_refused == 1
    })
    .await;
    assert_eq!(
        (s.tcp_received, s.oversized_bodies, s.tcp_timeouts),
        (3, 3, 0),
        "{s:?}"
    );
}
