package beam_dl.runners;

import java.util.Collections;
import java.util.List;
import org.apache.beam.sdk.util.construction.resources.PipelineResourcesDetector;

/**
 * Stages no jars with a job: for clusters whose JVMs already have Beam's classes on their
 * classpath, so that each job skips uploading and loading the job server's ~150 MB classpath.
 *
 * <p>Beam's {@code --pipeline_resources_detector_factory_class} (Java {@code
 * PipelineResourcesOptions}) names the factory; Beam calls {@link #create()}.
 */
public final class NoJarsToStage implements PipelineResourcesDetector.Factory {

  public static NoJarsToStage create() {
    return new NoJarsToStage();
  }

  @Override
  public PipelineResourcesDetector getPipelineResourcesDetector() {
    return new Nothing();
  }

  /** Detects nothing to stage. */
  static final class Nothing implements PipelineResourcesDetector {
    @Override
    public List<String> detect(ClassLoader classLoader) {
      return Collections.emptyList();
    }
  }
}
