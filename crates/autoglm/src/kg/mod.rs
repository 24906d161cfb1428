//! Knowledge graphs: an RDF store queried with SPARQL ([`store`]), and
//! WordNet 3.0 as RDF ([`wordnet`]).

pub mod ground;
pub mod qa;
pub mod reason;
pub mod store;
pub mod wordnet;

pub use store::{Answer, KnowledgeGraph, QueryLimits};
