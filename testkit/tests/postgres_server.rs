//! The throwaway PostgreSQL server the store suites run against (`outpost_testkit::postgres`):
//! it starts, hands out databases, keeps committed data across a clean stop and a crash, and
//! several run side by side.

use std::time::Instant;

use outpost_testkit::postgres::Postgres;

fn start() -> Postgres {
    let started = Instant::now();
    let server = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    eprintln!(
        "PostgreSQL started on port {} in {:?}",
        server.port(),
        started.elapsed()
    );
    server
}

#[test]
fn a_database_keeps_its_rows_across_a_stop_and_a_crash() {
    let mut server = start();
    let url = server.database("kept_rows").unwrap();
    assert_eq!(
        url,
        format!("postgres://outpost@127.0.0.1:{}/kept_rows", server.port())
    );
    assert_eq!(server.psql("kept_rows", "select 1").unwrap(), "1\n");
    server
        .psql(
            "kept_rows",
            "create table kept (value text); insert into kept values ('before stop')",
        )
        .unwrap();

    let port = server.port();
    server.stop().unwrap();
    let refused = server.psql("kept_rows", "select 1").unwrap_err();
    assert!(refused.contains("Connection refused"), "{refused}");
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_eq!(
        server.psql("kept_rows", "select value from kept").unwrap(),
        "before stop\n"
    );

    // An immediate stop writes no checkpoint: the row comes back from the write-ahead log.
    server
        .psql("kept_rows", "insert into kept values ('before crash')")
        .unwrap();
    server.crash().unwrap();
    server.restart().unwrap();
    assert_eq!(
        server
            .psql("kept_rows", "select value from kept order by value")
            .unwrap(),
        "before crash\nbefore stop\n"
    );
}

#[test]
fn database_names_outside_lower_case_letters_digits_and_underscore_are_refused() {
    let server = start();
    for name in ["", "Upper", "semi;colon", "quote'", &"x".repeat(64)] {
        let error = server.database(name).unwrap_err();
        assert!(
            error.contains("is not 1 to 63 of a-z, 0-9 and _"),
            "{error}"
        );
    }
    server.database(&"x".repeat(63)).unwrap();
    let taken = server
        .database("twice")
        .and_then(|_| server.database("twice"));
    assert!(taken.unwrap_err().contains("already exists"));
}

#[test]
fn servers_run_side_by_side_each_with_its_own_data() {
    let first = start();
    let second = start();
    assert_ne!(first.port(), second.port());
    first.database("side").unwrap();
    second.database("side").unwrap();
    first
        .psql("side", "create table only_here (id int)")
        .unwrap();
    let missing = second.psql("side", "select * from only_here").unwrap_err();
    assert!(missing.contains("does not exist"), "{missing}");
    assert_eq!(
        first.psql("postgres", "select current_user").unwrap(),
        "outpost\n"
    );
}
