//! The OpenAPI schemas of the alert model's constrained values (patterns, bounds, enumerations)
//! and of the request bodies, for the API's documentation only: the model's derives name these
//! as `value_type`s, and the HTTP API names [`RuleBody`] and [`ChannelBody`]. What they state,
//! the model's validation checks (the same [`Pattern`](super::Pattern)s).

use super::{BROKER, ChannelSpec, EMAIL, HOST, MAX_NAME, MAX_TEXT, OFFSET, RuleSpec, SECRET, TIME, TOPIC, URL};

macro_rules! string_schema {
    ($(#[$doc:meta])* $name:ident, $pattern:expr, $max:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                let mut b = utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .max_length(Some($max));
                let pattern: &str = $pattern;
                if !pattern.is_empty() {
                    b = b.pattern(Some(pattern));
                } else {
                    b = b.min_length(Some(1));
                }
                b.into()
            }
        }

        impl utoipa::ToSchema for $name {}
    };
}

/// An id (1 or more).
pub struct IdNumber;

impl utoipa::PartialSchema for IdNumber {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::Integer)
            .format(Some(utoipa::openapi::schema::SchemaFormat::KnownFormat(
                utoipa::openapi::schema::KnownFormat::Int64,
            )))
            .minimum(Some(1))
            .maximum(Some(i64::MAX))
            .into()
    }
}

impl utoipa::ToSchema for IdNumber {}

string_schema!(
    /// A filter text: 1 to 128 characters.
    FilterText, "", MAX_TEXT
);

/// An event kind name.
pub struct EventKindName;

impl utoipa::PartialSchema for EventKindName {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .enum_values(Some(its_shared::event::KIND_NAMES.iter().copied()))
            .into()
    }
}

impl utoipa::ToSchema for EventKindName {}

string_schema!(
    /// A time of day, `HH:MM` (00:00 to 23:59; `24:00` means midnight at the end of the day).
    TimeOfDay, TIME.source, 5
);
string_schema!(
    /// A fixed offset from UTC: `UTC`, `Z` or `+HH:MM` / `-HH:MM` (up to 23:59).
    UtcOffsetText, OFFSET.source, 6
);
string_schema!(
    /// An `http://` or `https://` URL: a host name (with a letter in its last label), an IPv4
    /// address or `localhost`, an optional port, path and query.
    WebhookUrl, URL.source, 2048
);
string_schema!(
    /// An MQTT broker: `mqtt://host[:port]` (1883 when left out).
    BrokerUrl, BROKER.source, 270
);
string_schema!(
    /// An MQTT topic: 1 to 256 characters without `+`, `#` or NUL; `{severity}` is replaced by
    /// the alert's severity.
    TopicText, TOPIC.source, 256
);
string_schema!(
    /// An e-mail address: `local@domain`.
    EmailAddress, EMAIL.source, 254
);
string_schema!(
    /// A host name or IPv4 address.
    HostText, HOST.source, 253
);
string_schema!(
    /// A secret or credential: 1 to 256 characters without control characters.
    SecretText, SECRET.source, 256
);

/// A name: 1 to 128 characters without control characters, not only white space (leading and
/// trailing white space is trimmed). The same schema as the fleet's names.
pub struct NameText;

impl utoipa::PartialSchema for NameText {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::schema::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .min_length(Some(1))
            .max_length(Some(MAX_NAME))
            .pattern(Some(NAME_PATTERN))
            .into()
    }
}

impl utoipa::ToSchema for NameText {}

/// Some character that is neither a control character nor white space, and no control character.
const NAME_PATTERN: &str = r"^[^\x00-\x1f\x7f-\x9f]*[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000][^\x00-\x1f\x7f-\x9f]*$";

/// Adds `additionalProperties: false` to every object of a schema that lists its properties
/// (what `deny_unknown_fields` means; utoipa leaves it out for enum variants).
fn closed(
    schema: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>,
) -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(o) => {
                if o.contains_key("properties") && !o.contains_key("additionalProperties") {
                    o.insert("additionalProperties".into(), false.into());
                }
                o.values_mut().for_each(walk);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut v) = serde_json::to_value(&schema) else { return schema };
    walk(&mut v);
    serde_json::from_value(v).unwrap_or(schema)
}

/// The request schema of a rule (every nested object closed).
pub struct RuleBody;

impl utoipa::PartialSchema for RuleBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        closed(<RuleSpec as utoipa::PartialSchema>::schema())
    }
}

impl utoipa::ToSchema for RuleBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "RuleSpec".into()
    }
}

/// The request schema of a channel (every nested object closed).
pub struct ChannelBody;

impl utoipa::PartialSchema for ChannelBody {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        closed(<ChannelSpec as utoipa::PartialSchema>::schema())
    }
}

impl utoipa::ToSchema for ChannelBody {
    fn name() -> std::borrow::Cow<'static, str> {
        "ChannelSpec".into()
    }
}
