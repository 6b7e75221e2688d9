use super::*;

fn owner(uid: &str, block: bool) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: format!("cm-{uid}"),
        uid: uid.into(),
        block_owner_deletion: Some(block),
        controller: None,
    }
}

fn node(owners: Vec<OwnerReference>) -> Node {
    Node {
        resource: 0,
        namespace: Some("default".into()),
        name: "x".into(),
        owners,
        deleting: false,
        foreground: false,
        orphan: false,
    }
}

fn synced() -> Graph {
    let mut g = Graph::default();
    g.sync();
    g
}

fn queued(g: &Graph) -> Vec<Work> {
    g.queue.iter().cloned().collect()
}

#[test]
fn a_dependent_of_a_known_owner_needs_no_look_until_the_owner_goes() {
    let mut g = synced();
    g.apply("o".into(), node(vec![]));
    g.apply("d".into(), node(vec![owner("o", false)]));
    assert!(g.queue.is_empty(), "the owner is in the graph");
    g.delete(&"o".into());
    assert_eq!(queued(&g), vec![Work::Delete("d".into())]);
}

#[test]
fn a_dependent_of_an_unknown_owner_is_looked_at() {
    let mut g = synced();
    g.apply("d".into(), node(vec![owner("nowhere", false)]));
    assert_eq!(queued(&g), vec![Work::Delete("d".into())]);
}

#[test]
fn foreground_deletion_queues_the_owner_and_its_dependents() {
    let mut g = synced();
    g.apply("o".into(), node(vec![]));
    g.apply("d".into(), node(vec![owner("o", true)]));
    let mut deleting = node(vec![]);
    deleting.deleting = true;
    deleting.foreground = true;
    g.apply("o".into(), deleting);
    let q = queued(&g);
    assert!(q.contains(&Work::Delete("o".into())));
    assert!(q.contains(&Work::Delete("d".into())));
    // The dependent going wakes the owner again.
    g.queue.clear();
    g.queued.clear();
    g.delete(&"d".into());
    assert_eq!(queued(&g), vec![Work::Delete("o".into())]);
}

#[test]
fn orphan_deletion_queues_the_orphaning() {
    let mut g = synced();
    let mut deleting = node(vec![]);
    deleting.deleting = true;
    deleting.orphan = true;
    g.apply("o".into(), deleting);
    assert_eq!(queued(&g), vec![Work::Orphan("o".into())]);
}

#[test]
fn work_in_progress_is_done_again_after_not_twice_at_once() {
    let mut g = synced();
    g.active.insert(Work::Delete("d".into()));
    g.enqueue(Work::Delete("d".into()));
    assert!(g.queue.is_empty());
    assert!(g.again.contains(&Work::Delete("d".into())));
}

#[test]
fn nothing_is_queued_before_every_type_is_listed() {
    let mut g = Graph::default();
    g.apply("d".into(), node(vec![owner("nowhere", false)]));
    assert!(g.queue.is_empty());
    g.sync();
    assert_eq!(queued(&g), vec![Work::Delete("d".into())]);
}
