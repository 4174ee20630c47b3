// The connector's JSON formatter for relaxed extended JSON, the mode `seg-compute cdc` writes.
// The connector ships DefaultJson (the legacy STRICT mode), ExtendedJson (canonical) and
// SimplifiedJson (plain strings for dates, ids and decimals), none of them relaxed. Build it
// against the connector's jar and put the class on the Connect worker's plugin path beside it:
//   javac -cp mongo-kafka-connect-<v>-all.jar RelaxedJson.java && jar cf relaxed-json.jar com
package com.example.segments;

import com.mongodb.kafka.connect.source.json.formatter.JsonWriterSettingsProvider;
import org.bson.json.JsonMode;
import org.bson.json.JsonWriterSettings;

public class RelaxedJson implements JsonWriterSettingsProvider {
  @Override
  public JsonWriterSettings getJsonWriterSettings() {
    return JsonWriterSettings.builder().outputMode(JsonMode.RELAXED).build();
  }
}
