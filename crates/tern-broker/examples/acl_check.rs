//! Time of one ACL check (`Acl::allows`) with an 11-rule ACL: 3 anonymous `topic` rules, 2
//! of user alice's, 5 patterns with `%c`/`%u`; the client dev-17 with username alice.
//! Run with `cargo run --release -p tern-broker --example acl_check`.

fn main() {
    let acl = tern_broker::acl::Acl::parse(
        "topic read $SYS/#\ntopic readwrite public/#\ntopic read news/+\n\
         user alice\ntopic readwrite alice/#\ntopic deny alice/secret\n\
         pattern readwrite devices/%c/#\npattern read users/%u/inbox\npattern write telemetry/%c/+\n\
         pattern read groups/%u/%c\npattern readwrite x/%c-%u/#\n",
    )
    .expect("a valid ACL");
    let topics: Vec<tern_codec::TopicName> = [
        "devices/dev-17/temp",
        "telemetry/dev-17/t",
        "public/a/b",
        "other/x",
    ]
    .iter()
    .map(|t| tern_codec::TopicName::new(*t).expect("valid"))
    .collect();
    let n = 2_000_000;
    let start = std::time::Instant::now();
    let mut yes = 0u64;
    for i in 0..n {
        let t = &topics[i % topics.len()];
        yes += u64::from(acl.allows(
            "dev-17",
            Some("alice"),
            tern_broker::acl::Permission::Write,
            std::hint::black_box(t),
        ));
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    println!("{ns:.1} ns per check ({yes} allowed)");
}
