//! Command-line definitions and dispatch.

mod admin;
mod client;
mod meta;
mod perf;
mod perf_bookie;
mod perf_broker;
mod server;

use clap::{Parser, Subcommand};

/// Magnetar: a Pulsar-compatible messaging cluster.
#[derive(Parser, Debug)]
#[command(name = "magnetar", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a metastore node (Raft metadata store).
    Metastore(server::MetastoreArgs),
    /// Run a bookie (storage node: journal + entry store).
    Bookie(server::BookieArgs),
    /// Run a broker (Pulsar protocol) against a metastore and bookies.
    Broker(server::BrokerArgs),
    /// Run everything on one machine over one data directory.
    Standalone(server::StandaloneArgs),
    /// Talk to a metastore cluster: get, put, del, ls, watch, cluster …
    Meta(meta::MetaArgs),
    /// Benchmarks.
    Perf(perf::PerfArgs),
    /// The broker's admin REST API with pulsar-admin's verbs: tenants, namespaces, topics …
    Admin(admin::AdminArgs),
    /// Send messages to a topic.
    Produce(client::ProduceArgs),
    /// Receive (and acknowledge) messages from a subscription.
    Consume(client::ConsumeArgs),
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Metastore(a) => server::metastore(a).await,
        Command::Bookie(a) => server::bookie(a).await,
        Command::Broker(a) => server::broker(a).await,
        Command::Standalone(a) => server::standalone(a).await,
        Command::Meta(a) => meta::run(a).await,
        Command::Perf(a) => perf::run(a).await,
        Command::Admin(a) => admin::run(a).await,
        Command::Produce(a) => client::produce(a).await,
        Command::Consume(a) => client::consume(a).await,
    }
}
