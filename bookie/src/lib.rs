//! Magnetar bookie: journal, entry storage and the ledger client (not built yet; see issue "Bookies and replicated ledgers").
