//! A fake upstream DNS server on loopback (UDP and TCP on the same port):
//! answers A queries from a fixed table, TXT queries with "ok", everything
//! else NXDOMAIN, and records the names it was asked, so a test can tell
//! whether a query reached it. It runs in the test process, outside every
//! monitored cgroup, and is the agent's only upstream in the tests.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    str::FromStr,
    sync::{Arc, Mutex},
    thread,
};

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, TXT},
        Name, RData, Record, RecordType,
    },
};

/// The fake resolver.
pub struct FakeDns {
    pub addr: SocketAddr,
    asked: Arc<Mutex<Vec<String>>>,
}

fn respond(
    raw: &[u8],
    table: &HashMap<String, Ipv4Addr>,
    asked: &Mutex<Vec<String>>,
) -> Option<Vec<u8>> {
    let q = Message::from_vec(raw).ok()?;
    let query = q.queries().first()?.clone();
    let name = query
        .name()
        .to_ascii()
        .trim_end_matches('.')
        .to_ascii_lowercase();
    asked.lock().unwrap().push(name.clone());
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(q.recursion_desired())
        .set_recursion_available(true);
    m.add_query(query.clone());
    let owner = Name::from_str(&format!("{name}.")).ok()?;
    match (query.query_type(), table.get(&name)) {
        (RecordType::A, Some(ip)) => {
            m.add_answer(Record::from_rdata(owner, 300, RData::A(A(*ip))));
        }
        (RecordType::AAAA, Some(_)) => {} // NODATA
        (RecordType::TXT, _) => {
            m.add_answer(Record::from_rdata(
                owner,
                60,
                RData::TXT(TXT::new(vec!["ok".into()])),
            ));
        }
        _ => {
            m.set_response_code(ResponseCode::NXDomain);
        }
    }
    m.to_vec().ok()
}

impl FakeDns {
    /// Starts on `ip`, on a port free for both UDP and TCP, answering
    /// `table` (name → IPv4).
    pub fn start(ip: Ipv4Addr, table: &[(&str, Ipv4Addr)]) -> Self {
        let table: Arc<HashMap<String, Ipv4Addr>> =
            Arc::new(table.iter().map(|(n, a)| (n.to_string(), *a)).collect());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind((ip, 0)).expect("bind fake DNS (UDP)");
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = TcpListener::bind((ip, port)) {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        {
            let (table, asked) = (Arc::clone(&table), Arc::clone(&asked));
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                    if let Some(r) = respond(&buf[..n], &table, &asked) {
                        let _ = udp.send_to(&r, peer);
                    }
                }
            });
        }
        {
            let (table, asked) = (Arc::clone(&table), Arc::clone(&asked));
            thread::spawn(move || {
                for s in tcp.incoming() {
                    let Ok(mut s) = s else { continue };
                    let (table, asked) = (Arc::clone(&table), Arc::clone(&asked));
                    thread::spawn(move || loop {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).is_err() {
                            return;
                        }
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if s.read_exact(&mut q).is_err() {
                            return;
                        }
                        let Some(r) = respond(&q, &table, &asked) else {
                            return;
                        };
                        let mut framed = (r.len() as u16).to_be_bytes().to_vec();
                        framed.extend_from_slice(&r);
                        if s.write_all(&framed).is_err() {
                            return;
                        }
                    });
                }
            });
        }
        FakeDns { addr, asked }
    }

    /// The names asked so far, lower case, without the root dot.
    pub fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}
