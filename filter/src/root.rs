//! Per-VM root context: loads and validates the plugin configuration and
//! creates one stream context per HTTP request.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{BufferType, ContextType};

use crate::config::PluginConfig;
use crate::host;
use crate::metrics::FilterMetrics;
use crate::stream::InferenceStream;

/// Upper bound on the plugin configuration read from the host.
const MAX_CONFIG_BYTES: usize = 4 * 1024 * 1024;

#[derive(Default)]
pub struct KvmeshRoot {
    config: Option<Rc<PluginConfig>>,
    metrics: Option<FilterMetrics>,
}

impl Context for KvmeshRoot {}

impl RootContext for KvmeshRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = match host::buffer(BufferType::PluginConfiguration, 0, MAX_CONFIG_BYTES) {
            Ok(bytes) => bytes,
            Err(err) => {
                log::error!("cannot read the plugin configuration: {err}");
                return false;
            }
        };
        let config = match PluginConfig::parse(&bytes) {
            Ok(config) => config,
            Err(err) => {
                log::error!("invalid plugin configuration: {err}");
                return false;
            }
        };
        let metrics = match FilterMetrics::define() {
            Ok(metrics) => metrics,
            Err(err) => {
                log::error!("cannot define metrics: {err}");
                return false;
            }
        };
        log::info!("configured, body limit {} bytes", config.max_body_bytes);
        self.config = Some(Rc::new(config));
        self.metrics = Some(metrics);
        true
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Envoy only creates streams after a successful on_configure; if it
        // ever does otherwise, no context means the request passes untouched.
        let config = self.config.clone()?;
        let metrics = self.metrics?;
        Some(Box::new(InferenceStream::new(config, metrics)))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
