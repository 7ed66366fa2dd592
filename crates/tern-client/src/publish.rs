//! A publish being built ([`Publish`]) and its outcome ([`Outcome`]): it resolves when
//! its QoS's guarantee is met.

use super::*;

impl Publish<'_> {
    /// At this QoS.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.publish("chat/room-1", "hi").qos(tern_client::QoS::AtLeastOnce).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn qos(mut self, qos: QoS) -> Self {
        self.qos = qos;
        self
    }

    /// With the retain flag.
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// client.publish("lamp/state", "on").retain(true).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }

    /// With these 5.0 properties (Message Expiry Interval, User Properties, ...).
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// let mut p = tern_client::PublishProperties::default();
    /// p.message_expiry_interval = Some(60); // gone if not delivered within a minute
    /// p.user_properties.push(("trace".into(), "abc".into()));
    /// client.publish("alerts/1", "smoke").properties(p).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn properties(mut self, properties: tern_codec::properties::PublishProperties) -> Self {
        self.properties = properties;
        self
    }
}

impl Publish<'_> {
    /// Hands the message to the client now, in call order, and returns its outcome to
    /// await later: many publishes can be under way at once and still go out in the
    /// order they were sent. (`.await` on the builder is `send()?.await`.)
    ///
    /// ```no_run
    /// # async fn run(client: tern_client::Client) -> Result<(), tern_client::Error> {
    /// use tern_client::QoS;
    /// let mut outcomes = Vec::new();
    /// for i in 0..100 {
    ///     outcomes.push(client.publish("orders", format!("{i}")).qos(QoS::AtLeastOnce).send()?);
    /// }
    /// for o in outcomes {
    ///     o.await?;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn send(self) -> Result<Outcome, Error> {
        // Checked on the borrowed string, then the String itself becomes the topic: no copy.
        if TopicName::check(&self.topic).is_err() {
            return Err(Error::Topic(self.topic));
        }
        let topic = TopicName::new(self.topic).map_err(|e| Error::Topic(e.to_string()))?;
        let mut m = Message::new(topic, self.payload, self.qos);
        m.retain = self.retain;
        let mut properties = self.properties;
        if let Some(stamp) = &self.client.stamp
            && !properties
                .user_properties
                .iter()
                .any(|(k, _)| *k == stamp.key)
        {
            let n = stamp.next.fetch_add(1, Ordering::Relaxed);
            properties
                .user_properties
                .push((stamp.key.clone(), format!("{}{n}", stamp.prefix).into()));
        }
        if properties != Default::default() {
            m.properties = properties.into();
        }
        let (tx, rx) = oneshot::channel();
        self.client.send(Command::Publish(m, tx))?;
        Ok(Outcome(rx))
    }
}

impl<'a> IntoFuture for Publish<'a> {
    type Output = Result<ReasonCode, Error>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'a>>;

    fn into_future(self) -> Self::IntoFuture {
        let outcome = self.send();
        Box::pin(async move { outcome?.await })
    }
}

impl Future for Outcome {
    type Output = Result<ReasonCode, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::Closed)))
    }
}
