//! TODO(owner): provider
