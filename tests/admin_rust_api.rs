//! The registrar is a Rust API, not only a gRPC handler (other front ends, e.g. a KServe
//! repository endpoint, call it): register, reconcile with changes made on disk, unregister.

mod admin_support;
mod common;

use adapterdrop_serve::repository::{Bundle, RegisterOptions};
use admin_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrar_registers_reconciles_and_unregisters_in_process() {
    let repo = temp_repo(&[]);
    let (app, registrar) = in_process_app(repo.path());
    let mut changes = app.registry.subscribe();

    let bundle = Bundle::copy_of(&registrar.tasks_root(), &source("sent")).unwrap();
    let done = registrar.register("rust-api", bundle, RegisterOptions { set_default: true, ..Default::default() }).await.unwrap();
    assert_eq!(done.entry.version, 1);
    assert_eq!(app.registry.resolve("rust-api", None).unwrap().version(), 1);
    assert_eq!(app.registry.pinned_version("rust-api"), Some(1));
    assert!(changes.has_changed().unwrap());
    changes.borrow_and_update();

    // A version another process put into the repository is served after a reconcile...
    copy_dir(&source("topic"), &repo.path().join("tasks/topic/1"));
    assert_eq!(registrar.reconcile().await.unwrap(), 1);
    assert!(app.registry.resolve("topic", None).is_ok());
    assert_eq!(registrar.reconcile().await.unwrap(), 0, "nothing more to do");
    // ...and one it removed is dropped.
    std::fs::remove_dir_all(repo.path().join("tasks/topic")).unwrap();
    assert_eq!(registrar.reconcile().await.unwrap(), 1);
    assert!(app.registry.resolve("topic", None).is_err());

    let removed = registrar.unregister("rust-api", None).await.unwrap();
    assert_eq!(removed.len(), 1);
    assert!(app.registry.resolve("rust-api", None).is_err());
    assert!(changes.has_changed().unwrap());
    assert!(staging_dirs(repo.path()).is_empty());
}
